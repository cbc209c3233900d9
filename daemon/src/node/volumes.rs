//! Which tenant and job a CSI volume acts for.
//!
//! The CSI plugin writes `<volumes_dir>/<volume_id>/volume.json` (the pod
//! cannot: only `data/` is mounted into it). The tenant comes from the pod's
//! namespace as the kubelet reported it, through the operator's
//! `[tenants] namespaces` map (`cairn_core::tenancy`); the `tenant`
//! attribute the pod may have written is only checked against it. Ingest
//! and the volume's own socket (`crate::server::volumes`) both bind a
//! volume through [`Node::volume_binding`], so they cannot disagree.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use cairn_core::ingest::{VOLUME_DATA_DIR, VOLUME_FILE, VolumeInfo};
use cairn_core::{FileName, JobName, Rank, TenantName};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::Node;
use crate::error::{Error, IoContext, Result};
use crate::pod_fs;
use crate::tier::memory::MemoryTier;

/// The directory in a volume's `data/` that holds its socket; hidden, so
/// ingest never takes it for a step.
pub const SOCKET_DIR: &str = ".cairn";
/// The volume's socket, in [`SOCKET_DIR`].
pub const SOCKET_NAME: &str = "cairn.sock";

/// Longest volume id accepted (kubelet's inline ids are `csi-` and a
/// 64-digit hash).
const MAX_VOLUME_ID_LEN: usize = 128;

/// What a volume is allowed to act for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeBinding {
    /// The CSI volume id.
    pub volume_id: String,
    /// Its tenant, decided by the cluster (namespace) and the operator.
    pub tenant: TenantName,
    /// Its job.
    pub job: JobName,
    /// The pod's rank (a volume still reads other ranks of its job, which
    /// resharding needs, and writes any: a DCP coordinator saves the
    /// metadata shard besides its own).
    pub rank: Rank,
    /// The pod's namespace.
    pub namespace: TenantName,
    /// The pod's UID, when the kubelet sent it.
    pub pod_uid: Option<String>,
    /// The volume's `data/`, as cairnd sees it.
    pub data_dir: PathBuf,
}

impl VolumeBinding {
    /// The volume's socket, as cairnd sees it (the pod sees it at
    /// `<its mount>/.cairn/cairn.sock`).
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join(SOCKET_DIR).join(SOCKET_NAME)
    }
}

/// Checks a volume id from outside: one path component, nothing hidden.
pub fn check_volume_id(volume_id: &str) -> Result<()> {
    let ok = !volume_id.is_empty()
        && volume_id.len() <= MAX_VOLUME_ID_LEN
        && !volume_id.starts_with('.')
        && volume_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "volume_id {:?} is not a CSI volume id (1 to {MAX_VOLUME_ID_LEN} letters, digits, \
             '-', '_' or '.', not starting with '.')",
            volume_id
                .chars()
                .take(MAX_VOLUME_ID_LEN)
                .collect::<String>()
        )))
    }
}

impl Node {
    /// The tenant `info`'s volume acts for; PERMISSION_DENIED when its pod
    /// asked for another or the kubelet did not name its namespace.
    pub fn volume_tenant(&self, info: &VolumeInfo) -> Result<TenantName> {
        info.tenant(&self.config.tenants)
            .map_err(|e| Error::PermissionDenied(format!("volume {}: {e}", info.volume_id)))
    }

    /// Reads and checks the volume `volume_id` the CSI plugin published.
    pub fn volume_binding(&self, volume_id: &str) -> Result<VolumeBinding> {
        check_volume_id(volume_id)?;
        let dir = self.config.ingest.volumes_dir.join(volume_id);
        let path = dir.join(VOLUME_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "volume {volume_id} is not published on this node (no {})",
                    path.display()
                )));
            }
            Err(e) => return Err(e).io_context(|| format!("reading {}", path.display())),
        };
        let info = VolumeInfo::decode(&bytes)?;
        if info.volume_id != volume_id {
            return Err(Error::FailedPrecondition(format!(
                "{} names volume {:?}, not {volume_id:?}",
                path.display(),
                info.volume_id
            )));
        }
        let tenant = self.volume_tenant(&info)?;
        let namespace =
            info.pod.namespace.clone().ok_or_else(|| {
                Error::PermissionDenied(format!("volume {volume_id}: no namespace"))
            })?;
        Ok(VolumeBinding {
            volume_id: info.volume_id,
            tenant,
            job: info.job,
            rank: info.rank,
            namespace,
            pod_uid: info.pod.uid,
            data_dir: dir.join(VOLUME_DATA_DIR),
        })
    }

    /// The ids of the volumes published on this node (directories of the
    /// volumes directory with a `volume.json`), for re-binding at start.
    pub fn published_volumes(&self) -> Vec<String> {
        let Ok(listing) = std::fs::read_dir(&self.config.ingest.volumes_dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = listing
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|id| check_volume_id(id).is_ok())
            .filter(|id| {
                self.config
                    .ingest
                    .volumes_dir
                    .join(id)
                    .join(VOLUME_FILE)
                    .is_file()
            })
            .collect();
        ids.sort();
        ids
    }
}

/// Where a volume's save sessions stage their files, in [`SOCKET_DIR`].
const SESSIONS_DIR: &str = "sessions";
/// Where restores over a volume's socket link a shard's files.
const RESTORED_DIR: &str = "restored";
/// Mode of cairnd's directories in a volume: the pod may read, not change.
const OWN_DIR_MODE: u32 = 0o755;
/// Mode of a file staged in a volume until its commit: the pod's user,
/// whatever its uid, writes it (only the pod can reach the directory).
const STAGED_MODE: u32 = 0o666;
/// Mode of a staged file once committed: read-only to everyone.
const COMMITTED_MODE: u32 = 0o444;

/// A file a save session staged in a volume, and the inode it must still be
/// at commit.
#[derive(Clone, Debug)]
pub struct VolumeStagedFile {
    /// Its name in the shard.
    pub name: FileName,
    /// Its path relative to the volume's root (what the pod opens).
    pub relative: String,
    /// Its path as cairnd sees it (for the idle check's `stat`).
    pub host_path: PathBuf,
    identity: (u64, u64),
}

impl VolumeBinding {
    fn own_dir(&self) -> Result<OwnedFd> {
        let data = pod_fs::open_dir(&self.data_dir)?;
        pod_fs::own_dir_at(
            data.as_fd(),
            SOCKET_DIR,
            OWN_DIR_MODE,
            &self.data_dir.join(SOCKET_DIR),
        )
    }

    fn shown(&self, relative: &str) -> PathBuf {
        self.data_dir.join(relative)
    }

    /// Creates the files of session `session` inside the volume, pre-sized
    /// and writable by the pod, and remembers each one's inode.
    pub fn stage_files(
        &self,
        session: &str,
        files: &[(FileName, u64)],
    ) -> Result<Vec<VolumeStagedFile>> {
        let own = self.own_dir()?;
        let base = format!("{SOCKET_DIR}/{SESSIONS_DIR}");
        let sessions =
            pod_fs::own_dir_at(own.as_fd(), SESSIONS_DIR, OWN_DIR_MODE, &self.shown(&base))?;
        let base = format!("{base}/{session}");
        let dir = pod_fs::own_dir_at(sessions.as_fd(), session, OWN_DIR_MODE, &self.shown(&base))?;
        files
            .iter()
            .map(|(name, size)| {
                let relative = format!("{base}/{name}");
                let shown = self.shown(&relative);
                let (parent, last) =
                    pod_fs::parent_dirs_at(dir.as_fd(), name.as_str(), OWN_DIR_MODE, &shown)?;
                let file = rustix::fs::openat(
                    &parent,
                    last,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(STAGED_MODE),
                )
                .map_err(|e| io_error(&shown, "creating", e))?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(STAGED_MODE))
                    .map_err(|e| io_error(&shown, "setting the mode of", e))?;
                rustix::fs::ftruncate(&file, *size).map_err(|e| io_error(&shown, "sizing", e))?;
                Ok(VolumeStagedFile {
                    name: name.clone(),
                    relative,
                    host_path: shown,
                    identity: pod_fs::identity(file.as_fd())?,
                })
            })
            .collect()
    }

    /// Takes session `session`'s files out of the volume into the memory
    /// tier's staging area of the same id: each must still be the inode it
    /// was created as (a pod that replaced one gets the commit refused), is
    /// linked through its descriptor and made read-only. Returns the tier's
    /// paths, in the order of `files`.
    pub fn take_staged(
        &self,
        session: &str,
        files: &[VolumeStagedFile],
        memory: &MemoryTier,
    ) -> Result<Vec<PathBuf>> {
        let data = pod_fs::open_dir(&self.data_dir)?;
        let own = pod_fs::dir_at(data.as_fd(), SOCKET_DIR, &self.shown(SOCKET_DIR))?;
        let sessions_shown = format!("{SOCKET_DIR}/{SESSIONS_DIR}");
        let sessions = pod_fs::dir_at(own.as_fd(), SESSIONS_DIR, &self.shown(&sessions_shown))?;
        let dir = pod_fs::dir_at(
            sessions.as_fd(),
            session,
            &self.shown(&format!("{sessions_shown}/{session}")),
        )?;
        files
            .iter()
            .map(|file| {
                let replaced = || {
                    Error::FailedPrecondition(format!(
                        "the staged file {} was replaced or removed before the commit; save again",
                        file.relative
                    ))
                };
                let (parent, last) = match file.name.as_str().rsplit_once('/') {
                    Some((dirs, last)) => {
                        let mut parent = rustix::io::fcntl_dupfd_cloexec(&dir, 0)
                            .map_err(|e| io_error(&file.host_path, "opening", e))?;
                        for component in dirs.split('/') {
                            parent = pod_fs::dir_at(parent.as_fd(), component, &file.host_path)
                                .map_err(|_| replaced())?;
                        }
                        (parent, last)
                    }
                    None => (
                        rustix::io::fcntl_dupfd_cloexec(&dir, 0)
                            .map_err(|e| io_error(&file.host_path, "opening", e))?,
                        file.name.as_str(),
                    ),
                };
                let (fd, kind, stat) =
                    pod_fs::entry_at(parent.as_fd(), last).map_err(|_| replaced())?;
                if kind != FileType::RegularFile || (stat.st_dev, stat.st_ino) != file.identity {
                    return Err(replaced());
                }
                pod_fs::chmod_fd(fd.as_fd(), COMMITTED_MODE, &file.host_path)?;
                memory.stage_link_fd(session, &file.name, fd.as_fd())
            })
            .collect()
    }

    /// Removes session `session`'s directory from the volume (after its
    /// commit or abort); a volume already gone is fine.
    pub fn remove_session(&self, session: &str) {
        let removed = pod_fs::open_dir(&self.data_dir)
            .and_then(|data| pod_fs::dir_at(data.as_fd(), SOCKET_DIR, &self.shown(SOCKET_DIR)))
            .and_then(|own| pod_fs::dir_at(own.as_fd(), SESSIONS_DIR, &self.shown(SESSIONS_DIR)))
            .and_then(|sessions| pod_fs::remove_tree_at(sessions.as_fd(), session));
        if let Err(e) = removed {
            tracing::debug!(volume_id = self.volume_id, session, error = %e, "could not remove a session's files from the volume");
        }
    }

    /// Removes every session directory (at bind: sessions do not survive a
    /// restart of cairnd).
    pub fn clear_sessions(&self) -> Result<()> {
        let own = self.own_dir()?;
        pod_fs::remove_tree_at(own.as_fd(), SESSIONS_DIR)
    }

    /// Links a restored shard's memory-tier files (`files`: name, path in
    /// the tier) into the volume, under a fresh directory for `rank` that
    /// replaces the rank's previous one; returns each file's path relative
    /// to the volume's root. The tier's files are cairnd's own, so their
    /// paths are trusted; everything on the volume's side goes through
    /// descriptors.
    pub fn link_restored(&self, rank: Rank, files: &[(FileName, PathBuf)]) -> Result<Vec<String>> {
        let own = self.own_dir()?;
        let base = format!("{SOCKET_DIR}/{RESTORED_DIR}");
        let restored =
            pod_fs::own_dir_at(own.as_fd(), RESTORED_DIR, OWN_DIR_MODE, &self.shown(&base))?;
        let prefix = format!("{rank}.");
        let name = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
        let base = format!("{base}/{name}");
        let dir = pod_fs::own_dir_at(restored.as_fd(), &name, OWN_DIR_MODE, &self.shown(&base))?;
        let relative = files
            .iter()
            .map(|(file, source)| {
                let relative = format!("{base}/{file}");
                let shown = self.shown(&relative);
                let (parent, last) =
                    pod_fs::parent_dirs_at(dir.as_fd(), file.as_str(), OWN_DIR_MODE, &shown)?;
                rustix::fs::linkat(rustix::fs::CWD, source, &parent, last, AtFlags::empty())
                    .map_err(|e| io_error(&shown, "linking", e))?;
                Ok(relative)
            })
            .collect::<Result<Vec<_>>>()?;
        // The rank's earlier restores: their names go (a pod still mapping
        // their files keeps them until it unmaps).
        let listing = rustix::fs::openat(
            &restored,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_error(&self.shown(&base), "listing", e))?;
        let mut older = Vec::new();
        for entry in rustix::fs::Dir::read_from(&listing)
            .map_err(|e| io_error(&self.shown(&base), "listing", e))?
            .flatten()
        {
            let entry_name = String::from_utf8_lossy(entry.file_name().to_bytes()).into_owned();
            if entry_name.starts_with(&prefix) && entry_name != name {
                older.push(entry_name);
            }
        }
        for entry_name in older {
            if let Err(e) = pod_fs::remove_tree_at(restored.as_fd(), &entry_name) {
                tracing::debug!(volume_id = self.volume_id, dir = entry_name, error = %e, "could not remove an earlier restore from the volume");
            }
        }
        Ok(relative)
    }
}

fn io_error(path: &Path, doing: &str, errno: Errno) -> Error {
    Error::Io {
        context: format!("{doing} {}", path.display()),
        source: errno.into(),
    }
}
