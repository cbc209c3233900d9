//! Ingest: step directories that frameworks write into the CSI plugin's
//! volumes become shards, without copying a byte.
//!
//! The CSI plugin bind-mounts `<volumes-dir>/<volume_id>/data/` into a pod;
//! the volumes directory is on the memory tier's tmpfs, and the plugin
//! describes each volume (tenant, job, rank, commit marker) in
//! `<volumes-dir>/<volume_id>/volume.json`. When the pod *finishes* a step
//! directory in `data/` — renames it from a temporary name to its final one
//! (Orbax), or writes the commit marker into it (`.metadata` for DCP) — the
//! directory's files are hard-linked into a memory-tier staging area and
//! committed exactly like a client's save (`Node::commit_staged_files`:
//! hashed in place, manifest written, renamed into `shards/`), so write-back
//! and upload follow as for any shard. The files then exist once on the
//! tmpfs under two names; the shard's bytes count in the memory tier while
//! the shard is there.
//!
//! What counts as finished, which step a name carries and how file names
//! are stored is decided by `cairn_core::ingest` (pure, tested on its own);
//! this module does the I/O around it:
//!
//! - one task watches the volumes directory with inotify: new volumes,
//!   their `data/` directories, step directories arriving (`IN_MOVED_TO`:
//!   renamed into place; `IN_CREATE`: created in place) and commit markers
//!   being written into not-yet-finished step directories (a watch is added
//!   before the marker is looked for, so none is missed);
//! - a slow rescan (`ingest.rescan_secs`) walks every volume as a safety
//!   net: at start (steps finished while cairnd was down), after an event
//!   queue overflow, and to retry failures;
//! - every step taken (or prefilled by the plugin) is listed in the
//!   volume's `ingested.json`, re-read before every decision, so a step is
//!   never taken twice, across restarts too; a shard the tiers already
//!   hold is never taken again either.
//!
//! Symbolic links and special files inside a step directory, and names
//! that cannot be stored, make the step refused: reported once, counted in
//! `cairn_ingest_failures_total{reason="refused"}`. Empty directories are
//! not kept (a shard holds files). After ingest the pod's files and the
//! shard's share their inodes: a pod that rewrote a file in place would
//! change the shard's copy, which every read re-hashes and repairs from a
//! slower tier; frameworks write new step directories instead.

mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cairn_core::ingest::{
    CommitPolicy, DirName, INGESTED_FILE, IngestSource, IngestedSteps, Trigger, VOLUME_DATA_DIR,
    VOLUME_FILE, Verdict, VolumeInfo, classify_dir_name, decide, stored_file_name,
};
use cairn_core::names::MAX_FILE_DEPTH;
use cairn_core::{FileName, Manifest, ShardKey, Step, TenantName};
use rustix::fs::inotify::{ReadFlags, WatchFlags};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{BeginShard, FileSpec, Node};
use crate::config::IngestConfig;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::tier::memory::MemoryTier;
use watch::{Event, Inotify};

/// Most files one step directory may hold.
const MAX_INGEST_FILES: usize = 100_000;
/// Shard metadata: the volume a step was ingested from.
const META_VOLUME: &str = "cairn.ingest.volume_id";
/// Shard metadata: the step directory's name in the volume.
const META_DIR: &str = "cairn.ingest.dir";

/// Events on the volumes directory: volumes appear and go.
fn root_events() -> WatchFlags {
    WatchFlags::CREATE | WatchFlags::MOVED_TO | WatchFlags::DELETE | WatchFlags::MOVED_FROM
}

/// Events on a volume's directory: `data/` and `volume.json` appear.
fn volume_events() -> WatchFlags {
    WatchFlags::CREATE | WatchFlags::MOVED_TO
}

/// Events on `data/`: step directories created or renamed into place.
fn data_events() -> WatchFlags {
    WatchFlags::CREATE | WatchFlags::MOVED_TO
}

/// Events on an unfinished step directory: a marker written or renamed in.
fn step_events() -> WatchFlags {
    WatchFlags::CLOSE_WRITE | WatchFlags::MOVED_TO
}

/// What a watch descriptor watches.
#[derive(Clone, Debug)]
enum Watched {
    /// The volumes directory.
    Root,
    /// `<volumes-dir>/<volume>`.
    Volume(String),
    /// `<volumes-dir>/<volume>/data`.
    Data(String),
    /// `<volumes-dir>/<volume>/data/<dir>`, waiting for its marker.
    Step { volume: String, dir: String },
}

/// Why a step directory was not ingested.
enum IngestError {
    /// Its contents cannot be a shard (links, special files, names): not
    /// retried until it changes.
    Refused(String),
    /// Something that may pass later (space, I/O): retried at the next
    /// rescan.
    Failed(Error),
}

impl From<Error> for IngestError {
    fn from(e: Error) -> Self {
        match e {
            Error::FailedPrecondition(reason) => IngestError::Refused(reason),
            other => IngestError::Failed(other),
        }
    }
}

/// What an ingest did.
enum Ingested {
    /// Committed as a new shard.
    New(Arc<Manifest>),
    /// The tiers already hold this shard (saved through the API, or
    /// ingested before `ingested.json` could be written).
    AlreadyHeld,
}

/// A file of a step directory, ready to be linked.
/// A file of a step directory, already linked into the staging area.
struct LinkedFile {
    stored: FileName,
    staged: PathBuf,
    size: u64,
}

/// Runs ingest until the node shuts down; returns at once when disabled.
pub(super) async fn run(node: Arc<Node>) {
    let config = node.config().ingest.clone();
    if !config.enabled {
        tracing::info!("ingest of CSI volumes is disabled");
        return;
    }
    let mut worker = Worker {
        node,
        config,
        inotify: None,
        watches: HashMap::new(),
        volumes: HashMap::new(),
        warned: HashSet::new(),
        renamed: HashSet::new(),
    };
    worker.run().await;
}

/// The ingest task's state. One task does everything, so two ingests never
/// race and `ingested.json` has one writer in the daemon.
struct Worker {
    node: Arc<Node>,
    config: IngestConfig,
    /// Set once the volumes directory exists.
    inotify: Option<Inotify>,
    watches: HashMap<i32, Watched>,
    /// The `volume.json` of each volume being watched, with the tenant its
    /// namespace is (`Node::volume_tenant`).
    volumes: HashMap<String, (VolumeInfo, TenantName)>,
    /// (volume, directory) pairs already reported, so a rescan does not
    /// repeat a warning every few seconds.
    warned: HashSet<(String, String)>,
    /// Directories that arrived by rename but failed to ingest: a rescan
    /// retries them as renamed (the event will not come again).
    renamed: HashSet<(String, String)>,
}

enum Wake {
    Stop,
    Rescan,
    Events(std::io::Result<Vec<Event>>),
}

impl Worker {
    async fn run(&mut self) {
        let mut tick = tokio::time::interval(self.config.rescan);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = {
                let events = async {
                    match &self.inotify {
                        Some(inotify) => inotify.next_batch().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = self.node.cancel.cancelled() => Wake::Stop,
                    _ = tick.tick() => Wake::Rescan,
                    events = events => Wake::Events(events),
                }
            };
            match wake {
                Wake::Stop => return,
                Wake::Rescan => {
                    if !self.rescan().await {
                        return;
                    }
                }
                Wake::Events(Ok(events)) => self.handle(events).await,
                Wake::Events(Err(e)) => {
                    tracing::error!(error = %e, "reading inotify events failed; relying on rescans");
                    self.inotify = None;
                    self.watches.clear();
                }
            }
        }
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.config.volumes_dir.join(volume)
    }

    fn data_dir(&self, volume: &str) -> PathBuf {
        self.volume_dir(volume).join(VOLUME_DATA_DIR)
    }

    /// Warns once per (volume, directory) until the volume goes away.
    fn warn_once(&mut self, volume: &str, dir: &str, message: &str, reason: &str) -> bool {
        if self.warned.insert((volume.to_owned(), dir.to_owned())) {
            tracing::warn!(volume_id = volume, dir, reason, "{message}");
            return true;
        }
        tracing::debug!(volume_id = volume, dir, reason, "{message}");
        false
    }

    fn watch(&mut self, path: &Path, flags: WatchFlags, what: Watched) {
        let Some(inotify) = &self.inotify else { return };
        match inotify.add(path, flags) {
            Ok(wd) => {
                self.watches.insert(wd, what);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot watch; the rescan will find what changes there");
            }
        }
    }

    /// Starts watching once the volumes directory exists. Returns false
    /// when ingest cannot work at all (another filesystem), which stops it.
    fn start_watching(&mut self) -> bool {
        let root = self.config.volumes_dir.clone();
        let Ok(meta) = fs::metadata(&root) else {
            return true; // not there yet: the CSI plugin creates it
        };
        let memory_dev = fs::metadata(self.node.memory.root()).map(|m| m.dev());
        if memory_dev.ok() != Some(meta.dev()) {
            tracing::error!(
                volumes_dir = %root.display(),
                memory_dir = %self.node.memory.root().display(),
                "ingest needs the volumes directory on the memory tier's filesystem \
                 (files are taken by hard link); ingest is off"
            );
            return false;
        }
        match Inotify::new() {
            Ok(inotify) => self.inotify = Some(inotify),
            Err(e) => {
                tracing::warn!(error = %e, "inotify is unavailable; ingest relies on rescans");
                return true;
            }
        }
        self.watch(&root, root_events(), Watched::Root);
        tracing::info!(volumes_dir = %root.display(), "ingest is watching CSI volumes");
        true
    }

    /// Walks every volume. Returns false when ingest must stop.
    async fn rescan(&mut self) -> bool {
        if self.inotify.is_none() {
            if !self.start_watching() {
                return false;
            }
            if !self.config.volumes_dir.is_dir() {
                return true;
            }
        }
        if !self.watches.values().any(|w| matches!(w, Watched::Root)) {
            // The volumes directory was removed and made again.
            let root = self.config.volumes_dir.clone();
            self.watch(&root, root_events(), Watched::Root);
        }
        let listing = match fs::read_dir(&self.config.volumes_dir) {
            Ok(listing) => listing,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the volumes directory");
                return true;
            }
        };
        let mut present = HashSet::new();
        for entry in listing.flatten() {
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if let (true, Ok(name)) = (is_dir, entry.file_name().into_string())
                && !name.starts_with('.')
            {
                present.insert(name);
            }
        }
        let gone: Vec<String> = self
            .volumes
            .keys()
            .filter(|v| !present.contains(*v))
            .cloned()
            .collect();
        for volume in gone {
            self.forget_volume(&volume);
        }
        for volume in present {
            self.add_volume(&volume).await;
        }
        self.node.metrics.ingest_scans.inc();
        true
    }

    fn forget_volume(&mut self, volume: &str) {
        self.volumes.remove(volume);
        self.warned.retain(|(v, _)| v != volume);
        self.renamed.retain(|(v, _)| v != volume);
    }

    /// Watches a volume (idempotent), reads its `volume.json`, and scans
    /// its `data/` directory.
    async fn add_volume(&mut self, volume: &str) {
        if volume.starts_with('.') {
            return;
        }
        let dir = self.volume_dir(volume);
        self.watch(&dir, volume_events(), Watched::Volume(volume.to_owned()));
        let info = match fs::read(dir.join(VOLUME_FILE)) {
            Ok(bytes) => VolumeInfo::decode(&bytes).and_then(|info| {
                if info.volume_id == volume {
                    Ok(info)
                } else {
                    Err(cairn_core::CoreError::InvalidValue {
                        field: VOLUME_FILE.into(),
                        reason: format!("names volume {} instead", info.volume_id),
                    })
                }
            }),
            // Not written yet: its arrival is reported.
            Err(_) => return,
        };
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                self.warn_once(
                    volume,
                    VOLUME_FILE,
                    "cannot read the volume's description; its steps are not ingested",
                    &e.to_string(),
                );
                return;
            }
        };
        let tenant = match self.node.volume_tenant(&info) {
            Ok(tenant) => tenant,
            Err(e) => {
                self.warn_once(
                    volume,
                    VOLUME_FILE,
                    "the volume has no tenant it may act for; its steps are not ingested",
                    &e.to_string(),
                );
                return;
            }
        };
        self.volumes.insert(volume.to_owned(), (info, tenant));
        let data = self.data_dir(volume);
        self.watch(&data, data_events(), Watched::Data(volume.to_owned()));
        let Ok(listing) = fs::read_dir(&data) else {
            return;
        };
        let mut names = Vec::new();
        for entry in listing.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match entry.file_name().into_string() {
                Ok(name) => names.push(name),
                Err(name) => {
                    let shown = name.to_string_lossy().into_owned();
                    self.warn_once(
                        volume,
                        &shown,
                        "step directory name is not UTF-8; ignored",
                        "not UTF-8",
                    );
                }
            }
        }
        names.sort();
        for name in names {
            let key = (volume.to_owned(), name.clone());
            let trigger = if self.renamed.contains(&key) {
                Trigger::Renamed
            } else {
                Trigger::Rescan
            };
            self.check(volume, &name, trigger).await;
        }
    }

    async fn handle(&mut self, events: Vec<Event>) {
        let mut rescan = false;
        for event in events {
            if event.mask.contains(ReadFlags::QUEUE_OVERFLOW) {
                rescan = true;
                continue;
            }
            if event.mask.contains(ReadFlags::IGNORED) {
                self.watches.remove(&event.wd);
                continue;
            }
            let Some(watched) = self.watches.get(&event.wd).cloned() else {
                continue;
            };
            let Some(name) = event.name.as_ref().and_then(|n| n.to_str()) else {
                continue;
            };
            let name = name.to_owned();
            let is_dir = event.mask.contains(ReadFlags::ISDIR);
            let arrived = event
                .mask
                .intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO);
            match watched {
                Watched::Root if is_dir && arrived => self.add_volume(&name).await,
                Watched::Root
                    if event
                        .mask
                        .intersects(ReadFlags::DELETE | ReadFlags::MOVED_FROM) =>
                {
                    self.forget_volume(&name)
                }
                Watched::Root => {}
                Watched::Volume(volume) => {
                    if arrived && (name == VOLUME_DATA_DIR || name == VOLUME_FILE) {
                        self.add_volume(&volume).await;
                    }
                }
                Watched::Data(volume) => {
                    if is_dir && arrived {
                        let trigger = if event.mask.contains(ReadFlags::MOVED_TO) {
                            Trigger::Renamed
                        } else {
                            Trigger::Observed
                        };
                        self.check(&volume, &name, trigger).await;
                    }
                }
                Watched::Step { volume, dir } => {
                    let marker = self
                        .policy(&volume)
                        .and_then(|p| p.marker().map(str::to_owned));
                    if !is_dir && marker.as_deref() == Some(name.as_str()) {
                        self.check(&volume, &dir, Trigger::Observed).await;
                    }
                }
            }
        }
        if rescan {
            tracing::info!("inotify queue overflowed; rescanning every volume");
            self.rescan().await;
        }
    }

    /// The commit policy of a known volume: its own, else the daemon's.
    fn policy(&self, volume: &str) -> Option<CommitPolicy> {
        let (info, _) = self.volumes.get(volume)?;
        Some(
            info.commit_marker
                .clone()
                .unwrap_or_else(|| self.config.commit_policy.clone()),
        )
    }

    fn read_ingested(&mut self, volume: &str) -> IngestedSteps {
        let path = self.volume_dir(volume).join(INGESTED_FILE);
        match fs::read(&path) {
            Ok(bytes) => match IngestedSteps::decode(&bytes) {
                Ok(steps) => steps,
                Err(e) => {
                    // The tiers still refuse to take a shard twice.
                    self.warn_once(
                        volume,
                        INGESTED_FILE,
                        "cannot read the list of ingested steps; checking the tiers instead",
                        &e.to_string(),
                    );
                    IngestedSteps::default()
                }
            },
            Err(_) => IngestedSteps::default(),
        }
    }

    fn record_ingested(&self, volume: &str, step: Step, dir: &str) -> Result<()> {
        let path = self.volume_dir(volume).join(INGESTED_FILE);
        let mut steps = match fs::read(&path) {
            Ok(bytes) => IngestedSteps::decode(&bytes).unwrap_or_default(),
            Err(_) => IngestedSteps::default(),
        };
        if !steps.record(step, dir, IngestSource::Ingested) {
            return Ok(());
        }
        let tmp = self
            .volume_dir(volume)
            .join(format!("{INGESTED_FILE}.{}.tmp", uuid::Uuid::new_v4()));
        let result = fsutil::write_atomic(&path, &tmp, &steps.encode(), false);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Looks at directory `name` of a volume's `data/` and ingests it when
    /// it is a finished step not taken before.
    async fn check(&mut self, volume: &str, name: &str, trigger: Trigger) {
        let Some(policy) = self.policy(volume) else {
            return;
        };
        let dir = self.data_dir(volume).join(name);
        if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return;
        }
        let ingested = self.read_ingested(volume);
        if let (Some(_), DirName::Step(step)) = (policy.marker(), classify_dir_name(name))
            && !ingested.contains(step)
        {
            // Watch before looking for the marker, so one written in
            // between is reported rather than missed.
            self.watch(
                &dir,
                step_events(),
                Watched::Step {
                    volume: volume.to_owned(),
                    dir: name.to_owned(),
                },
            );
        }
        let has_marker = policy
            .marker()
            .is_some_and(|m| fs::symlink_metadata(dir.join(m)).is_ok_and(|m| m.is_file()));
        match decide(&policy, name, trigger, has_marker, &ingested) {
            Verdict::Ingest(step) => self.ingest(volume, name, step, trigger).await,
            Verdict::NoStep => {
                self.warn_once(
                    volume,
                    name,
                    "directory name has no step number (e.g. 100, step_100); not ingested",
                    "no step number",
                );
            }
            Verdict::NotFinished(step) => {
                tracing::debug!(volume_id = volume, dir = name, %step, marker = %policy, "step directory not finished yet");
            }
            Verdict::Temporary | Verdict::AlreadyIngested(_) => {}
        }
    }

    async fn ingest(&mut self, volume: &str, name: &str, step: Step, trigger: Trigger) {
        let Some((info, tenant)) = self.volumes.get(volume).cloned() else {
            return;
        };
        let key = ShardKey {
            tenant,
            job: info.job,
            step,
            rank: info.rank,
        };
        let metadata = BTreeMap::from([
            (META_VOLUME.to_owned(), volume.to_owned()),
            (META_DIR.to_owned(), name.to_owned()),
        ]);
        let dir = self.data_dir(volume).join(name);
        let retry_key = (volume.to_owned(), name.to_owned());
        match self.node.ingest_dir(&key, &dir, metadata).await {
            Ok(outcome) => {
                self.renamed.remove(&retry_key);
                self.warned.remove(&retry_key);
                match outcome {
                    Ingested::New(manifest) => {
                        self.node.metrics.ingested_shards.inc();
                        tracing::info!(
                            volume_id = volume,
                            dir = name,
                            shard = %key,
                            files = manifest.files.len(),
                            bytes = manifest.total_bytes(),
                            "step ingested"
                        );
                    }
                    Ingested::AlreadyHeld => {
                        tracing::info!(volume_id = volume, dir = name, shard = %key, "the tiers already hold this shard; not ingested again");
                    }
                }
                if let Err(e) = self.record_ingested(volume, step, name) {
                    tracing::warn!(volume_id = volume, dir = name, error = %e, "cannot record the ingested step; the tiers still refuse to take it twice");
                }
            }
            Err(IngestError::Refused(reason)) => {
                if self.warn_once(
                    volume,
                    name,
                    "step directory refused; not ingested",
                    &reason,
                ) {
                    self.node
                        .metrics
                        .ingest_failures
                        .with_label_values(&["refused"])
                        .inc();
                }
            }
            Err(IngestError::Failed(e)) => {
                self.node
                    .metrics
                    .ingest_failures
                    .with_label_values(&["error"])
                    .inc();
                if trigger == Trigger::Renamed {
                    self.renamed.insert(retry_key);
                }
                self.warn_once(
                    volume,
                    name,
                    "ingesting step directory failed; retrying at the next rescan",
                    &e.to_string(),
                );
            }
        }
    }
}

impl Node {
    /// Takes the files of step directory `dir` into the memory tier as the
    /// shard `key`: hard links into a staging area, then the same commit as
    /// a client's save. Space is reserved first (evicting steps the disk
    /// tier holds, as for a save), since the shard's bytes count in the tier
    /// from now on.
    async fn ingest_dir(
        &self,
        key: &ShardKey,
        dir: &Path,
        metadata: BTreeMap<String, String>,
    ) -> std::result::Result<Ingested, IngestError> {
        let started = Instant::now();
        if self.memory.contains(key) || self.disk.contains(key) {
            return Ok(Ingested::AlreadyHeld);
        }
        let id = format!("ingest-{}", uuid::Uuid::new_v4());
        let linked = {
            let memory = Arc::clone(&self.memory);
            let staging = id.clone();
            let root = dir.to_path_buf();
            tokio::task::spawn_blocking(move || link_step_files(&memory, &staging, &root)).await
        };
        let result = match linked {
            Ok(Ok(files)) => self.commit_links(&id, key, files, metadata).await,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(IngestError::Failed(e.into())),
        };
        match result {
            Ok(manifest) => {
                // The pod still reads these files: never recycle them (the
                // memory tier also checks their link count).
                self.memory.mark_exported(key);
                self.shard_committed(&manifest, started);
                Ok(Ingested::New(manifest))
            }
            Err(e) => {
                if let Err(discard) = self.memory.discard_staged(&id) {
                    tracing::warn!(error = %discard, "removing an ingest staging area failed");
                }
                self.update_usage_metrics();
                Err(e)
            }
        }
    }

    /// Reserves the linked files' bytes (they count in the tier from now
    /// on) and commits them as the shard `key`.
    async fn commit_links(
        &self,
        id: &str,
        key: &ShardKey,
        files: Vec<LinkedFile>,
        metadata: BTreeMap<String, String>,
    ) -> std::result::Result<Arc<Manifest>, IngestError> {
        // Saturating: sizes come from files a pod made (sparse ones can be
        // huge); a sum past u64::MAX simply does not fit the tier.
        let total = files.iter().fold(0u64, |t, f| t.saturating_add(f.size));
        self.reserve_memory(id, &key.tenant, total)?;
        let paths = files.iter().map(|f| f.staged.clone()).collect();
        let request = BeginShard {
            key: key.clone(),
            files: files
                .into_iter()
                .map(|f| FileSpec {
                    name: f.stored,
                    size: f.size,
                    metadata: BTreeMap::new(),
                })
                .collect(),
            world_size: None,
            metadata,
            attempt: None,
        };
        Ok(self.commit_staged_files(id, &request, paths).await?)
    }
}

/// Walks the step directory `root` and hard-links each regular file into
/// the memory tier's staging area `id`, sorted by stored name.
///
/// The pod owns every directory below `root` and may swap any of them for
/// a symbolic link at any moment, so no path below `root` is resolved twice:
/// each directory is opened relative to its parent's descriptor with
/// `O_NOFOLLOW`, each entry is opened `O_PATH | O_NOFOLLOW` and checked
/// with `fstat` on that descriptor, and a file is linked through its
/// descriptor (`MemoryTier::stage_link_fd`). A link anywhere refuses the
/// step; a swap after an entry was opened changes nothing, since the
/// descriptor still names what was checked. Descriptors held: one per level
/// of depth, plus one.
fn link_step_files(
    memory: &MemoryTier,
    id: &str,
    root: &Path,
) -> std::result::Result<Vec<LinkedFile>, IngestError> {
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| match errno {
        Errno::LOOP | Errno::NOTDIR => {
            IngestError::Refused(format!("{} is not a directory", root.display()))
        }
        errno => IngestError::Failed(Error::Io {
            context: format!("opening {}", root.display()),
            source: errno.into(),
        }),
    })?;
    let mut out = Vec::new();
    link_dir(memory, id, &dir, "", 1, &mut out)?;
    if out.is_empty() {
        return Err(IngestError::Refused("it holds no files".into()));
    }
    out.sort_by(|a, b| a.stored.cmp(&b.stored));
    Ok(out)
}

fn link_dir(
    memory: &MemoryTier,
    id: &str,
    dir: &OwnedFd,
    prefix: &str,
    depth: usize,
    out: &mut Vec<LinkedFile>,
) -> std::result::Result<(), IngestError> {
    let refused = IngestError::Refused;
    let io = |what: &str| {
        let what = if prefix.is_empty() {
            what.to_owned()
        } else {
            format!("{what} {prefix}")
        };
        move |errno: Errno| {
            IngestError::Failed(Error::Io {
                context: what,
                source: errno.into(),
            })
        }
    };
    let names = {
        let readable = rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("opening the step directory"))?;
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&readable).map_err(io("listing"))? {
            let entry = entry.map_err(io("listing"))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        names
    };
    // The window in which a pod would swap a listed directory for a link.
    crate::failpoint::fault_point("ingest.after_listing");
    for name in names {
        let Ok(name) = String::from_utf8(name) else {
            return Err(refused(format!(
                "{} has a name that is not UTF-8",
                if prefix.is_empty() {
                    "the step"
                } else {
                    prefix
                }
            )));
        };
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let entry = match rustix::fs::openat(
            dir,
            name.as_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(entry) => entry,
            // Removed since the listing: the pod is still changing the step.
            Err(Errno::NOENT) => {
                return Err(refused(format!("{relative} disappeared while it was read")));
            }
            Err(errno) => return Err(io("opening an entry of")(errno)),
        };
        let stat = rustix::fs::fstat(&entry).map_err(io("inspecting an entry of"))?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => {
                if depth >= MAX_FILE_DEPTH {
                    return Err(refused(format!(
                        "{relative} is nested deeper than {MAX_FILE_DEPTH} levels"
                    )));
                }
                link_dir(memory, id, &entry, &relative, depth.saturating_add(1), out)?;
            }
            FileType::RegularFile => {
                let stored = stored_file_name(&relative).map_err(|e| refused(e.to_string()))?;
                let staged = memory.stage_link_fd(id, &stored, entry.as_fd())?;
                out.push(LinkedFile {
                    stored,
                    staged,
                    size: u64::try_from(stat.st_size).unwrap_or(0),
                });
                if out.len() > MAX_INGEST_FILES {
                    return Err(refused(format!(
                        "it holds more than {MAX_INGEST_FILES} files"
                    )));
                }
            }
            FileType::Symlink => {
                return Err(refused(format!("{relative} is a symbolic link")));
            }
            _ => {
                return Err(refused(format!(
                    "{relative} is not a regular file (a device, socket or FIFO)"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn linked(memory: &MemoryTier, root: &Path) -> std::result::Result<Vec<(String, u64)>, String> {
        let id = format!("ingest-{}", uuid::Uuid::new_v4());
        let result = match link_step_files(memory, &id, root) {
            Ok(files) => Ok(files
                .iter()
                .map(|f| (f.stored.as_str().to_owned(), f.size))
                .collect()),
            Err(IngestError::Refused(r)) => Err(r),
            Err(IngestError::Failed(e)) => panic!("failed: {e}"),
        };
        memory.discard_staged(&id).expect("discard");
        result
    }

    #[test]
    fn step_trees_are_linked_with_stored_names_and_links_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let memory = MemoryTier::open(&dir.path().join("memory"), 1 << 30, 0).expect("memory");
        let root = dir.path().join("step_5");
        fs::create_dir_all(root.join("default/d")).expect("dirs");
        fs::create_dir_all(root.join("empty")).expect("empty dir");
        fs::write(root.join(".metadata"), b"meta").expect("write");
        fs::write(root.join("__0_0.distcp"), vec![1u8; 10]).expect("write");
        fs::write(root.join("default/d/abc"), b"x").expect("write");
        assert_eq!(
            linked(&memory, &root).expect("linked"),
            vec![
                ("_.metadata".to_owned(), 4),
                ("___0_0.distcp".to_owned(), 10),
                ("default/d/abc".to_owned(), 1)
            ]
        );

        symlink("/etc/passwd", root.join("default/passwd")).expect("symlink");
        let reason = linked(&memory, &root).expect_err("a link refuses the step");
        assert!(
            reason.contains("default/passwd is a symbolic link"),
            "{reason}"
        );
        fs::remove_file(root.join("default/passwd")).expect("remove");

        // A directory of the step that is a link (to anywhere) refuses it too.
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).expect("outside");
        fs::write(outside.join("secret"), b"another tenant's").expect("write");
        fs::rename(root.join("default"), dir.path().join("moved")).expect("move");
        symlink(&outside, root.join("default")).expect("symlink dir");
        let reason = linked(&memory, &root).expect_err("a linked directory");
        assert!(reason.contains("default is a symbolic link"), "{reason}");
        fs::remove_file(root.join("default")).expect("remove");
        // And the step directory itself.
        let linked_root = dir.path().join("step_6");
        symlink(&outside, &linked_root).expect("symlink root");
        assert!(linked(&memory, &linked_root).is_err());

        fs::write(root.join("bad name"), b"x").expect("write");
        assert!(linked(&memory, &root).is_err());
    }
}
