//! What the plugin keeps on disk: one record per published volume under
//! `<state-dir>/volumes/<volume_id>.json`, and each volume's `volume.json`.
//!
//! Kubelet may restart the plugin at any time; the records are how a new
//! process learns which volumes it published, so that NodeGetVolumeStats
//! keeps answering and NodeUnpublishVolume still cleans up. Every file is
//! written atomically (temp file, fsync, rename, fsync directory): a reader
//! sees the old content or the new, never half of either. Leftover temp
//! files from a crash are removed when the store opens.

use std::fs::DirBuilder;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result};
use crate::volume::{VolumeId, VolumeSpec};

/// The record format's version, written into every record and
/// `volume.json`, so that the daemon's ingest and later plugins can tell
/// what they read.
pub const FORMAT_VERSION: u32 = 1;

/// Suffix of a file being written; never read as a record.
const TEMP_SUFFIX: &str = ".tmp";
/// Suffix of a record file.
const RECORD_SUFFIX: &str = ".json";

/// A published volume: the validated spec plus when it was published. The
/// same document is the state record and the volume's `volume.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// [`FORMAT_VERSION`] when written.
    pub format: u32,
    /// The validated publish arguments.
    #[serde(flatten)]
    pub spec: VolumeSpec,
    /// When the volume was first published, RFC 3339 in UTC.
    pub published_at: String,
}

impl VolumeRecord {
    /// A record for `spec`, published now.
    pub fn new(spec: VolumeSpec) -> Self {
        Self {
            format: FORMAT_VERSION,
            spec,
            published_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
        }
    }

    /// The record as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

/// The state directory's record files.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
}

/// A record file that could not be loaded, and why.
#[derive(Debug)]
pub struct BadRecord {
    /// The file.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

impl StateStore {
    /// Opens (creating, mode 0700) `<state_dir>/volumes/` and removes temp
    /// files a crash left behind.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("volumes");
        create_private_dir(&dir, 0o700)?;
        for entry in std::fs::read_dir(&dir).io_context(|| format!("listing {}", dir.display()))? {
            let entry = entry.io_context(|| format!("listing {}", dir.display()))?;
            if entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
                let path = entry.path();
                std::fs::remove_file(&path)
                    .io_context(|| format!("removing leftover {}", path.display()))?;
            }
        }
        Ok(Self { dir })
    }

    /// The record file of `id`.
    pub fn record_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}{RECORD_SUFFIX}"))
    }

    /// Every readable record, plus the files that were not (corrupt JSON, a
    /// name that does not match its volume id). Bad files are reported and
    /// left in place for an operator to look at.
    pub fn load(&self) -> Result<(Vec<VolumeRecord>, Vec<BadRecord>)> {
        let mut records = Vec::new();
        let mut bad = Vec::new();
        let listing = std::fs::read_dir(&self.dir)
            .io_context(|| format!("listing {}", self.dir.display()))?;
        for entry in listing {
            let entry = entry.io_context(|| format!("listing {}", self.dir.display()))?;
            let path = entry.path();
            if !entry.file_name().to_string_lossy().ends_with(RECORD_SUFFIX) {
                continue;
            }
            let bytes =
                std::fs::read(&path).io_context(|| format!("reading {}", path.display()))?;
            match serde_json::from_slice::<VolumeRecord>(&bytes) {
                Ok(record) if self.record_path(&record.spec.volume_id) == path => {
                    records.push(record);
                }
                Ok(record) => bad.push(BadRecord {
                    reason: format!(
                        "holds volume {} but is not named after it",
                        record.spec.volume_id
                    ),
                    path,
                }),
                Err(e) => bad.push(BadRecord {
                    reason: e.to_string(),
                    path,
                }),
            }
        }
        records.sort_by(|a, b| a.spec.volume_id.cmp(&b.spec.volume_id));
        Ok((records, bad))
    }

    /// Writes `record` atomically.
    pub fn save(&self, record: &VolumeRecord) -> Result<()> {
        let path = self.record_path(&record.spec.volume_id);
        write_atomically(&path, &record.to_json(), 0o600)
    }

    /// Removes the record of `id`; a missing record is not an error.
    pub fn remove(&self, id: &VolumeId) -> Result<()> {
        let path = self.record_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).io_context(|| format!("removing {}", path.display())),
        }
    }

    /// The directory the records live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Creates `dir` and its missing parents; sets `mode` on `dir` itself
/// (explicitly, so the umask cannot widen or narrow it).
pub fn create_private_dir(dir: &Path, mode: u32) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .io_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .io_context(|| format!("setting the mode of {}", dir.display()))
}

/// Writes `bytes` to `path` atomically and durably: a temp file beside it,
/// fsync, rename over `path`, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(TEMP_SUFFIX);
    let temp = PathBuf::from(temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temp)
        .io_context(|| format!("creating {}", temp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .io_context(|| format!("writing {}", temp.display()))?;
    drop(file);
    std::fs::rename(&temp, path)
        .io_context(|| format!("renaming {} to {}", temp.display(), path.display()))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// fsyncs a directory, making a rename or removal in it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .io_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::volume::{AccessMode, AccessType, Capability, PublishRequest, attr};

    fn spec(id: &str) -> VolumeSpec {
        let req = PublishRequest {
            volume_id: id.into(),
            target_path: format!("/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/{id}/mount"),
            capability: Some(Capability {
                access_type: Some(AccessType::Mount {
                    fs_type: String::new(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                }),
                access_mode: Some(AccessMode::SingleNodeWriter),
            }),
            volume_context: BTreeMap::from([
                (attr::EPHEMERAL.to_string(), "true".to_string()),
                (attr::JOB.to_string(), "job".to_string()),
                (attr::RANK.to_string(), "2".to_string()),
                (attr::TENANT.to_string(), "team".to_string()),
                (attr::POD_NAMESPACE.to_string(), "team".to_string()),
            ]),
            ..PublishRequest::default()
        };
        VolumeSpec::from_request(&req, Path::new("/var/lib/kubelet")).expect("valid spec")
    }

    #[test]
    fn records_survive_a_reopen_and_bad_files_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = StateStore::open(dir.path()).expect("open");
        let a = VolumeRecord::new(spec("vol-a"));
        let b = VolumeRecord::new(spec("vol-b"));
        store.save(&a).expect("save a");
        store.save(&b).expect("save b");
        std::fs::write(store.dir().join("vol-c.json"), b"{not json").expect("corrupt");
        std::fs::write(store.dir().join("vol-d.json"), a.to_json()).expect("misnamed");
        std::fs::write(store.dir().join("vol-e.json.tmp"), b"partial").expect("temp");

        let store = StateStore::open(dir.path()).expect("reopen");
        assert!(!store.dir().join("vol-e.json.tmp").exists());
        let (records, bad) = store.load().expect("load");
        assert_eq!(records, vec![a.clone(), b]);
        assert_eq!(bad.len(), 2, "{bad:?}");

        store.remove(&a.spec.volume_id).expect("remove");
        store.remove(&a.spec.volume_id).expect("remove twice");
        let (records, _) = store.load().expect("load");
        assert_eq!(records.len(), 1);
        let mode = std::fs::metadata(store.dir())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn the_daemon_reads_the_record_as_written() {
        use cairn_core::ingest::{
            CommitPolicy, VOLUME_DATA_DIR, VOLUME_FILE, VOLUME_FORMAT, VolumeInfo,
        };
        assert_eq!(FORMAT_VERSION, VOLUME_FORMAT);
        assert_eq!(crate::volume::SPEC_FILE, VOLUME_FILE);
        assert_eq!(crate::volume::DATA_DIR, VOLUME_DATA_DIR);
        let mut record = VolumeRecord::new(spec("vol-a"));
        let info = VolumeInfo::decode(&record.to_json()).expect("decode");
        assert_eq!(info.volume_id, "vol-a");
        assert_eq!(info.job.as_str(), "job");
        assert_eq!(info.rank.0, 2);
        assert_eq!(
            info.pod.namespace.as_ref().map(|n| n.as_str()),
            record.spec.pod.namespace.as_deref()
        );
        assert_eq!(info.tenant_attribute, record.spec.tenant_attribute);
        assert_eq!(info.commit_marker, None);
        record.spec.commit_marker = Some(CommitPolicy::Marker(".metadata".into()));
        let info = VolumeInfo::decode(&record.to_json()).expect("decode");
        assert_eq!(info.commit_marker, record.spec.commit_marker);
    }

    #[test]
    fn the_record_names_what_ingest_needs() {
        let json = String::from_utf8(VolumeRecord::new(spec("vol-a")).to_json()).expect("utf-8");
        for field in [
            "\"format\": 1",
            "\"volume_id\": \"vol-a\"",
            "\"job\": \"job\"",
            "\"rank\": 2",
            "\"tenant\": \"team\"",
            "\"restore\": \"latest\"",
            "\"read_only\": false",
            "\"published_at\"",
            "\"step_dir_format\": \"{step}\"",
            "\"target_path\"",
            "\"pod\"",
        ] {
            assert!(json.contains(field), "{field} missing from {json}");
        }
    }
}
