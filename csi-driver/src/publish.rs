//! Publishing and unpublishing volumes on this node: the filesystem and
//! mount work behind NodePublishVolume, NodeUnpublishVolume and
//! NodeGetVolumeStats.
//!
//! # Layout
//!
//! ```text
//! <volumes-dir>/<volume_id>/volume.json     the VolumeRecord (job, rank, tenant, ...)
//! <volumes-dir>/<volume_id>/data/           bind-mounted onto the target path
//! <volumes-dir>/<volume_id>/ingested.json   steps ingested or pre-filled (cairn_core::ingest)
//! <state-dir>/volumes/<volume_id>.json      the same record: what this node published
//! ```
//!
//! The daemon's ingest relies on the first three: it reads `volume.json` to
//! know whose checkpoints `data/` holds, and, since the volumes directory is
//! inside the memory tier, takes finished steps out of `data/` by hard link.
//! Publish pre-fills `data/` with the checkpoint `restore` asks for before
//! mounting it (`prefill.rs`).
//!
//! # Rules
//!
//! - Every method is called with validated arguments ([`VolumeSpec`],
//!   [`VolumeId`], a target strictly under the kubelet directory) and runs
//!   on a blocking thread.
//! - One operation per volume at a time: [`Volumes::begin`] hands out a
//!   per-volume [`InFlight`] guard; a second call for the same volume gets
//!   ABORTED, as the CSI spec allows. Other volumes are never blocked.
//! - Publish records the volume before mounting and unpublish removes the
//!   record last, so a crash at any point leaves something a repeated call
//!   (which the CO makes) can finish.
//! - Nothing outside the volumes directory, the state directory and the
//!   given target is ever created or removed. Targets are checked component
//!   by component for symbolic links, so a link planted under the kubelet
//!   directory cannot redirect a mount or a removal elsewhere.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustix::fs::Access;

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::mount;
use crate::mountinfo::{self, MountEntry};
use crate::prefill::{self, DaemonClient};
use crate::store::{StateStore, VolumeRecord, create_private_dir, write_atomically};
use crate::usage::{self, Usage};
use crate::volume::{DATA_DIR, SPEC_FILE, VolumeId, VolumeSpec, shown, volume_dir};

/// Test hooks: named points where the `FAILPOINTS` environment variable
/// (the `fail` crate) can make the plugin pause, e.g.
/// `FAILPOINTS=csi.publish.start=sleep(2000)`. The integration tests use
/// them to hold one call in progress while they race another against it.
/// With `FAILPOINTS` unset a hook costs one lookup in an empty registry.
pub mod hooks {
    /// Start of NodePublishVolume's work, the volume's guard held.
    pub const PUBLISH_START: &str = "csi.publish.start";
    /// Start of NodeUnpublishVolume's work, the volume's guard held.
    pub const UNPUBLISH_START: &str = "csi.unpublish.start";

    pub(crate) fn pause_point(name: &'static str) {
        fail::eval(name, |_| ());
    }
}

/// Mode of each volume's directory and its `data/`: the owner (root, the
/// plugin) and its group; pods see `data/` through the bind mount.
const VOLUME_DIR_MODE: u32 = 0o750;
/// Mode of `volume.json`.
const SPEC_FILE_MODE: u32 = 0o640;
/// Mode of target directories the plugin creates.
const TARGET_DIR_MODE: u32 = 0o750;

/// The volumes this node has published, and the operations in progress.
#[derive(Debug)]
pub struct Volumes {
    volumes_dir: PathBuf,
    kubelet_dir: PathBuf,
    state_dir: PathBuf,
    store: StateStore,
    records: Mutex<HashMap<VolumeId, VolumeRecord>>,
    in_flight: Mutex<HashSet<VolumeId>>,
    daemon: DaemonClient,
}

/// Holds one volume for one operation; dropping it lets the next one in.
#[derive(Debug)]
pub struct InFlight {
    volumes: Arc<Volumes>,
    id: VolumeId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.volumes.in_flight).remove(&self.id);
    }
}

/// What is mounted at a target.
enum MountState {
    NotMounted,
    /// This volume's `data/` (the last mount stacked there).
    Ours,
    /// Something else.
    Foreign(PathBuf),
}

impl Volumes {
    /// Creates the directories, loads the records a previous process left,
    /// and reports recorded volumes whose target is no longer mounted (they
    /// are kept until the CO unpublishes them).
    pub fn open(config: &Config) -> Result<Arc<Self>> {
        create_private_dir(&config.volumes_dir, VOLUME_DIR_MODE)?;
        create_private_dir(&config.state_dir, 0o700)?;
        let store = StateStore::open(&config.state_dir)?;
        let (records, bad) = store.load()?;
        for bad in &bad {
            tracing::error!(
                path = %bad.path.display(),
                reason = %bad.reason,
                "skipping an unreadable volume record; it stays for an operator to inspect"
            );
        }
        for record in &records {
            let spec = &record.spec;
            let mounted = mountinfo::is_mount_point(&spec.target_path)
                .io_context(|| format!("reading {}", mountinfo::MOUNTINFO))?;
            if mounted {
                tracing::info!(
                    volume_id = %spec.volume_id,
                    job = %spec.job,
                    rank = %spec.rank,
                    target = %spec.target_path.display(),
                    "recovered a published volume"
                );
            } else {
                tracing::warn!(
                    volume_id = %spec.volume_id,
                    job = %spec.job,
                    rank = %spec.rank,
                    target = %spec.target_path.display(),
                    "a recorded volume's target is not a mount point; keeping the record \
                     until the volume is unpublished"
                );
            }
        }
        Ok(Arc::new(Self {
            volumes_dir: config.volumes_dir.clone(),
            kubelet_dir: config.kubelet_dir.clone(),
            state_dir: config.state_dir.clone(),
            store,
            records: Mutex::new(
                records
                    .into_iter()
                    .map(|r| (r.spec.volume_id.clone(), r))
                    .collect(),
            ),
            in_flight: Mutex::new(HashSet::new()),
            daemon: DaemonClient::new(
                config.daemon_socket.clone(),
                config.prefill_timeout,
                // The volumes directory is inside the memory tier.
                config.volumes_dir.parent().unwrap_or(Path::new("/")),
            )?,
        }))
    }

    /// Claims `id` for one operation, or ABORTED if another holds it.
    pub fn begin(self: &Arc<Self>, id: &VolumeId) -> Result<InFlight> {
        if !lock(&self.in_flight).insert(id.clone()) {
            return Err(Error::Aborted(format!(
                "another operation on volume {id} is in progress; retry later"
            )));
        }
        Ok(InFlight {
            volumes: Arc::clone(self),
            id: id.clone(),
        })
    }

    /// The record of `id`, if published here.
    pub fn record(&self, id: &VolumeId) -> Option<VolumeRecord> {
        lock(&self.records).get(id).cloned()
    }

    /// How many volumes are recorded as published.
    pub fn len(&self) -> usize {
        lock(&self.records).len()
    }

    /// Whether no volume is recorded as published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the volumes and state directories are usable (Probe).
    pub fn is_ready(&self) -> bool {
        [
            &self.volumes_dir,
            &self.state_dir,
            &self.store.dir().to_path_buf(),
        ]
        .iter()
        .all(|dir| {
            dir.is_dir()
                && rustix::fs::access(dir.as_path(), Access::WRITE_OK | Access::EXEC_OK).is_ok()
        })
    }

    /// NodePublishVolume: makes `spec`'s volume appear at its target.
    /// Idempotent: the same spec on a mounted target is OK without a second
    /// mount; another spec for the same volume is ALREADY_EXISTS (same
    /// target) or FAILED_PRECONDITION (another target). The caller holds
    /// the volume's [`InFlight`] guard.
    pub fn publish(&self, spec: VolumeSpec) -> Result<()> {
        hooks::pause_point(hooks::PUBLISH_START);
        let existing = self.record(&spec.volume_id);
        if let Some(existing) = &existing {
            if existing.spec.target_path != spec.target_path {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is already published at {}; a volume has one target",
                    spec.volume_id,
                    existing.spec.target_path.display()
                )));
            }
            if existing.spec != spec {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already published at {} with different arguments ({})",
                    spec.volume_id,
                    spec.target_path.display(),
                    differences(&existing.spec, &spec)
                )));
            }
        }
        let fresh = existing.is_none();
        let record = existing.unwrap_or_else(|| VolumeRecord::new(spec));
        self.publish_record(&record, fresh)
    }

    fn publish_record(&self, record: &VolumeRecord, fresh: bool) -> Result<()> {
        let spec = &record.spec;
        match self.mount_state(&spec.target_path, &spec.volume_id)? {
            MountState::Ours if !fresh => {
                tracing::info!("volume already published; nothing to do");
                return Ok(());
            }
            MountState::Foreign(root) => {
                return Err(Error::FailedPrecondition(format!(
                    "{} is already a mount point of {}, not of volume {}",
                    spec.target_path.display(),
                    root.display(),
                    spec.volume_id
                )));
            }
            MountState::Ours | MountState::NotMounted => {}
        }
        self.prepare_target(&spec.target_path)?;
        let result = self.create_and_mount(record);
        if let Err(e) = &result
            && fresh
        {
            tracing::warn!(error = %e, "publish failed; undoing what it did");
            if let Err(undo) = self.undo_publish(spec) {
                tracing::error!(error = %undo, "could not undo a failed publish");
            }
        }
        result
    }

    /// Creates the volume's directories and files, records it, pre-fills
    /// `data/` as `restore` asks, and mounts `data/` onto the (existing)
    /// target unless it already is.
    fn create_and_mount(&self, record: &VolumeRecord) -> Result<()> {
        let spec = &record.spec;
        let dir = volume_dir(&self.volumes_dir, &spec.volume_id);
        let data = dir.join(DATA_DIR);
        create_private_dir(&dir, VOLUME_DIR_MODE)?;
        create_private_dir(&data, VOLUME_DIR_MODE)?;
        write_atomically(&dir.join(SPEC_FILE), &record.to_json(), SPEC_FILE_MODE)?;
        self.store.save(record)?;
        lock(&self.records).insert(spec.volume_id.clone(), record.clone());
        // cairnd decides the tenant (the pod's namespace, through the
        // operator's map) and serves the volume's socket before the pod
        // starts; prefill then restores for that tenant alone.
        let bound = VolumeSpec {
            tenant: self.daemon.bind_volume(&spec.volume_id)?,
            ..spec.clone()
        };
        let spec = &bound;
        match self.mount_state(&spec.target_path, &spec.volume_id)? {
            MountState::NotMounted => {
                prefill::prefill(&dir, spec, &self.daemon)?;
                mount::bind(&data, &spec.target_path, spec.read_only)?
            }
            MountState::Ours => {
                tracing::warn!("target was mounted but not recorded; kept the mount");
            }
            MountState::Foreign(root) => {
                return Err(Error::FailedPrecondition(format!(
                    "{} became a mount point of {} while publishing",
                    spec.target_path.display(),
                    root.display()
                )));
            }
        }
        tracing::info!(
            job = %spec.job,
            rank = %spec.rank,
            tenant = %spec.tenant,
            read_only = spec.read_only,
            data = %data.display(),
            "volume published"
        );
        Ok(())
    }

    /// Undoes a fresh publish that failed half-way: unmounts only this
    /// volume's own mount, removes the target only if it is an empty
    /// directory, then the volume's directory and record.
    fn undo_publish(&self, spec: &VolumeSpec) -> Result<()> {
        let id = &spec.volume_id;
        let unmounted = mount::unmount_owned(&spec.target_path, |m| is_data_of(m, id))?;
        if let Some(root) = unmounted.left {
            tracing::debug!(other = %root.display(), "left another mount at the target");
        }
        if let Err(e) = std::fs::remove_dir(&spec.target_path) {
            tracing::debug!(error = %e, "left the target in place");
        }
        self.forget(&spec.volume_id)
    }

    /// NodeUnpublishVolume: takes this volume's mounts off the target,
    /// removes the target directory, the volume's directory and its record.
    ///
    /// Idempotent, and it touches only what is provably this volume's:
    ///
    /// - a volume recorded at another target: OK, nothing is touched;
    /// - a mount at the target is taken off only while its source is this
    ///   volume's `data/` (the kernel's mount table says so, not the
    ///   record), so another volume published at the same path keeps its
    ///   mount and its target;
    /// - a volume with no record and no mount at the target (never
    ///   published, already unpublished, or published elsewhere): OK, and
    ///   the target is left as it is. Only the volume's own leftovers (a
    ///   publish that failed before recording) are removed, and not while
    ///   its `data/` is mounted anywhere.
    ///
    /// A volume whose record was lost (unreadable at start) but which is
    /// mounted at the target is still unpublished: its mount names it.
    ///
    /// The volume's directory is deleted with everything in it. Steps the
    /// daemon ingested live on as shards (their files are hard links in the
    /// memory tier); what it did not ingest goes with the volume, as with
    /// any ephemeral volume.
    pub fn unpublish(&self, id: &VolumeId, target: &Path) -> Result<()> {
        hooks::pause_point(hooks::UNPUBLISH_START);
        let record = self.record(id);
        if let Some(record) = &record
            && record.spec.target_path != target
        {
            tracing::info!(
                published_at = %record.spec.target_path.display(),
                "unpublish for a target the volume is not published at; nothing to do"
            );
            return Ok(());
        }
        let exists = self.target_exists(target)?;
        let unmounted = if exists {
            mount::unmount_owned(target, |m| is_data_of(m, id))?
        } else {
            mount::Unmounted::default()
        };
        if record.is_none() && unmounted.count == 0 {
            // Not published at this target: never published, already
            // unpublished, or mounted elsewhere. Whatever is at the target
            // (another volume's mount, the CO's directory) is not ours.
            let elsewhere = data_mounts(&read_mounts()?, id);
            if !elsewhere.is_empty() {
                tracing::info!(
                    mounted_at = %display_paths(&elsewhere),
                    "unpublish for a target the volume is not mounted at; nothing to do"
                );
                return Ok(());
            }
            tracing::info!("volume not published at this target; nothing to do there");
            // The volume's own leftovers, if a publish failed before
            // recording it.
            return self.forget(id);
        }
        match &unmounted.left {
            Some(root) => tracing::warn!(
                other = %root.display(),
                "the target holds a mount that is not this volume's; left it and the target in place"
            ),
            None if exists => match std::fs::remove_dir(target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .io_context(|| format!("removing the target {}", target.display()));
                }
            },
            None => {}
        }
        if record.is_none() {
            tracing::warn!("unpublished a volume that was mounted at the target but had no record");
        }
        self.forget(id)?;
        tracing::info!("volume unpublished");
        Ok(())
    }

    /// Removes the volume's directory (refusing while anything is mounted
    /// in it) and then its record.
    fn forget(&self, id: &VolumeId) -> Result<()> {
        let dir = volume_dir(&self.volumes_dir, id);
        let entries = read_mounts()?;
        let busy = mountinfo::mounts_under(&entries, &dir);
        if !busy.is_empty() || !mountinfo::mounts_at(&entries, &dir).is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{} still has mounts ({}); not deleting it",
                dir.display(),
                display_paths(&busy)
            )));
        }
        let elsewhere = data_mounts(&entries, id);
        if !elsewhere.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id}'s data is still mounted at {}; not deleting it",
                display_paths(&elsewhere)
            )));
        }
        // Best effort: a cairnd that is down serves no socket, and does not
        // serve this one again once the directory is gone.
        if dir.exists()
            && let Err(e) = self.daemon.unbind_volume(id)
        {
            tracing::warn!(error = %e, "cairnd did not stop serving the volume's socket");
        }
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&dir)
                .io_context(|| format!("removing the volume directory {}", dir.display()))?,
            // A stray file or link with the volume's name: remove it, never
            // what a link points to.
            Ok(_) => {
                std::fs::remove_file(&dir).io_context(|| format!("removing {}", dir.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).io_context(|| format!("inspecting {}", dir.display())),
        }
        self.store.remove(id)?;
        lock(&self.records).remove(id);
        Ok(())
    }

    /// NodeGetVolumeStats: what the volume's `data/` uses, NOT_FOUND unless
    /// `id` is published here at `volume_path`. The path is only compared
    /// with the record, never validated or opened, so a path of any form
    /// that the volume is not published at is NOT_FOUND.
    pub fn stats(&self, id: &VolumeId, volume_path: &str) -> Result<Usage> {
        let Some(record) = self.record(id) else {
            return Err(Error::NotFound(format!(
                "volume {id} is not published on this node"
            )));
        };
        if record.spec.target_path != Path::new(volume_path) {
            return Err(Error::NotFound(format!(
                "volume {id} is published at {}, not at {}",
                record.spec.target_path.display(),
                shown(volume_path)
            )));
        }
        let data = volume_dir(&self.volumes_dir, id).join(DATA_DIR);
        usage::measure(&data).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!(
                    "volume {id}'s directory {} is missing",
                    data.display()
                ))
            } else {
                Error::Io {
                    context: format!("measuring {}", data.display()),
                    source: e,
                }
            }
        })
    }

    /// What is mounted at `target`: judged by the last mount stacked there,
    /// whose root must be this volume's `data/`.
    fn mount_state(&self, target: &Path, id: &VolumeId) -> Result<MountState> {
        let entries = read_mounts()?;
        let Some(top) = mountinfo::mounts_at(&entries, target).pop() else {
            return Ok(MountState::NotMounted);
        };
        if is_data_of(top, id) {
            Ok(MountState::Ours)
        } else {
            Ok(MountState::Foreign(top.root.clone()))
        }
    }

    /// Creates the target and any missing parents below the kubelet
    /// directory, refusing symbolic links and non-directories on the way.
    fn prepare_target(&self, target: &Path) -> Result<()> {
        let mut current = self.kubelet_dir.clone();
        for component in self.relative_target(target)?.components() {
            current.push(component);
            if !self.check_component(&current)? {
                std::fs::DirBuilder::new()
                    .mode(TARGET_DIR_MODE)
                    .create(&current)
                    .or_else(|e| {
                        // Lost a race with the CO creating it: fine if it
                        // is a real directory now.
                        if e.kind() == std::io::ErrorKind::AlreadyExists
                            && std::fs::symlink_metadata(&current).is_ok_and(|m| m.is_dir())
                        {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .io_context(|| format!("creating {}", current.display()))?;
            }
        }
        Ok(())
    }

    /// Whether `target` exists, checking every component below the kubelet
    /// directory the same way as [`Volumes::prepare_target`].
    fn target_exists(&self, target: &Path) -> Result<bool> {
        let mut current = self.kubelet_dir.clone();
        for component in self.relative_target(target)?.components() {
            current.push(component);
            if !self.check_component(&current)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `Ok(true)`: a real directory; `Ok(false)`: missing; an error for a
    /// symbolic link or anything else.
    fn check_component(&self, path: &Path) -> Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => Ok(true),
            Ok(meta) if meta.file_type().is_symlink() => Err(Error::FailedPrecondition(format!(
                "{} is a symbolic link; cairn-csi uses only real directories under {}",
                path.display(),
                self.kubelet_dir.display()
            ))),
            Ok(_) => Err(Error::FailedPrecondition(format!(
                "{} exists and is not a directory",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).io_context(|| format!("inspecting {}", path.display())),
        }
    }

    fn relative_target<'a>(&self, target: &'a Path) -> Result<&'a Path> {
        target.strip_prefix(&self.kubelet_dir).map_err(|_| {
            Error::InvalidArgument(format!(
                "{} is not under the kubelet directory {}",
                target.display(),
                self.kubelet_dir.display()
            ))
        })
    }
}

/// Whether `mount`'s source is volume `id`'s `data/`: its root (the
/// source directory relative to its filesystem) ends in `<id>/data`. The
/// mount table, not the record, is what says whose a mount is.
fn is_data_of(mount: &MountEntry, id: &VolumeId) -> bool {
    mount.root.ends_with(Path::new(id.as_str()).join(DATA_DIR))
}

/// Where volume `id`'s `data/` is mounted, anywhere.
fn data_mounts(entries: &[MountEntry], id: &VolumeId) -> Vec<PathBuf> {
    entries
        .iter()
        .filter(|e| is_data_of(e, id))
        .map(|e| e.mount_point.clone())
        .collect()
}

fn read_mounts() -> Result<Vec<MountEntry>> {
    mountinfo::read().io_context(|| format!("reading {}", mountinfo::MOUNTINFO))
}

/// Paths for a message: comma-separated.
fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fields two specs differ in, for an ALREADY_EXISTS message.
fn differences(old: &VolumeSpec, new: &VolumeSpec) -> String {
    let mut out = Vec::new();
    let mut diff = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name}: {a} -> {b}"));
        }
    };
    diff("job", old.job.to_string(), new.job.to_string());
    diff("rank", old.rank.to_string(), new.rank.to_string());
    diff("tenant", old.tenant.to_string(), new.tenant.to_string());
    diff("restore", old.restore.to_string(), new.restore.to_string());
    diff(
        "stepDirFormat",
        old.step_dir_format.to_string(),
        new.step_dir_format.to_string(),
    );
    diff(
        "commitMarker",
        format!("{:?}", old.commit_marker.as_ref().map(|m| m.to_string())),
        format!("{:?}", new.commit_marker.as_ref().map(|m| m.to_string())),
    );
    diff(
        "read_only",
        old.read_only.to_string(),
        new.read_only.to_string(),
    );
    diff(
        "access_mode",
        old.access_mode.to_string(),
        new.access_mode.to_string(),
    );
    diff(
        "rank_source",
        format!("{:?}", old.rank_source),
        format!("{:?}", new.rank_source),
    );
    diff("pod", format!("{:?}", old.pod), format!("{:?}", new.pod));
    out.join(", ")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
