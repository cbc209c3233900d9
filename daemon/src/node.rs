//! The node: sessions, commits, write-back, retention and restore over the
//! local tiers.
//!
//! This is where the save and restore paths of `ARCHITECTURE.md` live. The
//! gRPC services translate messages into the calls below and nothing else;
//! the tiers know their own layout and nothing of each other. The node owns
//! the rules that span tiers:
//!
//! * a shard is acknowledged once committed in the memory tier, then written
//!   back to the disk tier by a background worker;
//! * a step leaves the memory tier (retention or pressure) only once the disk
//!   tier holds every shard of it;
//! * chunks are removed from the disk tier only under the write side of
//!   `gc_lock`, which copies into and restores from the disk tier hold for
//!   reading, so collection never races a copy between its chunks and its
//!   manifest.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_core::{
    EvictionCandidate, FileEntry, FileName, JobName, MANIFEST_VERSION, Manifest, Rank, ShardKey,
    Step, StepResidency, TenantName, choose_pressure_victims, latest_complete_step,
};
use futures::{StreamExt, stream};
use tokio::sync::{RwLock, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::hashing;
use crate::metrics::Metrics;
use crate::tier::disk::{DiskTier, GcReport};
use crate::tier::memory::MemoryTier;
use crate::tier::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};
use crate::transfer::{self, FillReport};

/// Write-back attempts before a shard is marked failed.
const WRITEBACK_ATTEMPTS: u32 = 3;
/// First delay between write-back attempts; doubles each time.
const WRITEBACK_RETRY_DELAY: Duration = Duration::from_secs(1);

/// One file a client wants to save.
#[derive(Clone, Debug)]
pub struct FileSpec {
    /// Validated relative name.
    pub name: FileName,
    /// Exact size in bytes.
    pub size: u64,
    /// Client metadata.
    pub metadata: BTreeMap<String, String>,
}

/// A validated BeginShard.
#[derive(Clone, Debug)]
pub struct BeginShard {
    /// The shard to save.
    pub key: ShardKey,
    /// Its files.
    pub files: Vec<FileSpec>,
    /// The job's number of ranks, if known.
    pub world_size: Option<u32>,
    /// Shard metadata.
    pub metadata: BTreeMap<String, String>,
}

/// A staged file handed to the client.
#[derive(Clone, Debug)]
pub struct StagedFile {
    /// Its name in the shard.
    pub name: FileName,
    /// Where to write it.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
}

struct Session {
    request: BeginShard,
    /// The writer's process id, when it connected over the Unix socket.
    owner_pid: Option<i32>,
    paths: Vec<PathBuf>,
    opened: Instant,
    committing: bool,
}

/// Where a shard stands in the disk tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskState {
    /// Not there and not queued.
    Absent,
    /// Queued or being written.
    Pending,
    /// Complete and durable.
    Durable,
    /// Write-back failed with this error.
    Failed(String),
}

/// One shard as listed.
#[derive(Clone, Debug)]
pub struct ShardView {
    /// The rank.
    pub rank: Rank,
    /// Its bytes.
    pub total_bytes: u64,
    /// Declared world size.
    pub world_size: Option<u32>,
    /// Whether the memory tier holds it.
    pub in_memory: bool,
    /// Its disk state.
    pub disk: DiskState,
}

/// One step as listed.
#[derive(Clone, Debug)]
pub struct StepView {
    /// The step.
    pub step: Step,
    /// Every rank's shard is complete in some local tier.
    pub restorable: bool,
    /// Its shards, by rank.
    pub shards: Vec<ShardView>,
}

/// What a restore produced.
#[derive(Clone, Debug)]
pub struct RestoreOutcome {
    /// The shard's manifest.
    pub manifest: Arc<Manifest>,
    /// Readable paths in the memory tier, in manifest order.
    pub paths: Vec<PathBuf>,
    /// Bytes by the tier they came from.
    pub bytes_by_tier: BTreeMap<TierKind, u64>,
}

/// A chunk found bad by verify.
#[derive(Clone, Debug)]
pub struct VerifyFinding {
    /// Shard rank.
    pub rank: Rank,
    /// File name.
    pub file: String,
    /// Offset in the file.
    pub offset: u64,
    /// The chunk.
    pub chunk: cairn_core::ChunkId,
    /// What was wrong.
    pub problem: String,
    /// Whether it was rewritten from another tier.
    pub repaired: bool,
}

/// A step of a job, optionally narrowed to one rank.
#[derive(Clone, Debug)]
pub struct StepSelection {
    /// Owner.
    pub tenant: TenantName,
    /// Job.
    pub job: JobName,
    /// Step.
    pub step: Step,
    /// One rank, or every rank on this node.
    pub rank: Option<Rank>,
}

impl StepSelection {
    fn matches(&self, key: &ShardKey) -> bool {
        key.step == self.step && self.rank.is_none_or(|r| key.rank == r)
    }
}

/// Usage of one tier, for status.
#[derive(Clone, Debug)]
pub struct TierStatus {
    /// Which tier.
    pub tier: TierKind,
    /// Its directory.
    pub path: PathBuf,
    /// Bytes used.
    pub used: u64,
    /// Capacity (0: unlimited).
    pub capacity: u64,
    /// Shards held.
    pub shards: u64,
}

/// The daemon's state and operations.
pub struct Node {
    config: Config,
    /// T0.
    pub memory: Arc<MemoryTier>,
    /// T1.
    pub disk: Arc<DiskTier>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<String, Session>>,
    writeback: Mutex<HashMap<ShardKey, DiskState>>,
    changes: watch::Sender<u64>,
    writeback_tx: mpsc::UnboundedSender<ShardKey>,
    gc_lock: RwLock<()>,
    cancel: CancellationToken,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    /// Opens the tiers, starts the write-back worker and the session reaper,
    /// and queues write-back for shards the memory tier holds but the disk
    /// tier lacks (a previous run's unfinished work).
    pub fn start(
        config: Config,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>> {
        let memory = Arc::new(MemoryTier::open(
            &config.memory_dir,
            config.memory_capacity,
            config.memory_pool_bytes,
        )?);
        let disk = Arc::new(DiskTier::open(&config.disk_dir)?);
        let (writeback_tx, writeback_rx) = mpsc::unbounded_channel();
        let node = Arc::new(Self {
            config,
            memory,
            disk,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            writeback: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
            writeback_tx,
            gc_lock: RwLock::new(()),
            cancel,
        });
        for manifest in node.memory.shards() {
            if !node.disk.contains(&manifest.shard) {
                node.queue_writeback(manifest.shard.clone());
            }
        }
        tokio::spawn(Arc::clone(&node).writeback_loop(writeback_rx));
        tokio::spawn(Arc::clone(&node).reap_sessions());
        node.update_usage_metrics();
        Ok(node)
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Resolves an optional tenant from a request.
    pub fn tenant(&self, requested: &str) -> Result<TenantName> {
        if requested.is_empty() {
            Ok(self.config.default_tenant.clone())
        } else {
            Ok(TenantName::parse("tenant", requested.to_owned())?)
        }
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn sources(&self) -> [&dyn ShardSource; 2] {
        [&*self.memory, &*self.disk]
    }

    // ----- save path -------------------------------------------------------

    /// Opens a save session: checks the request, reserves memory-tier space
    /// (evicting steps the disk tier already holds if needed) and creates the
    /// pre-sized files.
    ///
    /// `owner_pid` is the writer's process id when known (Unix socket peer
    /// credentials): a session whose writer has died is aborted as soon as
    /// anyone notices (the reaper, or a new writer for the same shard), so a
    /// restarted trainer can save the same step again at once.
    #[tracing::instrument(skip_all, fields(shard = %request.key))]
    pub async fn begin(
        &self,
        request: BeginShard,
        owner_pid: Option<i32>,
    ) -> Result<(String, Vec<StagedFile>)> {
        let key = &request.key;
        if let Some(ws) = request.world_size
            && (ws == 0 || key.rank.0 >= ws)
        {
            return Err(Error::InvalidArgument(format!(
                "world_size {ws} must be above 0 and above rank {}",
                key.rank
            )));
        }
        check_file_names(&request.files)?;
        if self.memory.contains(key) || self.disk.contains(key) {
            return Err(Error::AlreadyExists(format!(
                "shard {key} is already committed"
            )));
        }
        let session_id = uuid::Uuid::new_v4().to_string();
        let existing = lock(&self.sessions)
            .iter()
            .find(|(_, s)| &s.request.key == key)
            .map(|(id, s)| (id.clone(), s.owner_pid, s.committing));
        if let Some((id, owner, committing)) = existing {
            if committing || owner.is_none_or(process_alive) {
                return Err(Error::Aborted(format!(
                    "shard {key} is being written by another session ({id}{}); abort it or wait for its commit",
                    owner.map(|p| format!(", pid {p}")).unwrap_or_default()
                )));
            }
            tracing::warn!(session = %id, pid = ?owner, "the previous writer of this shard is gone; aborting its session");
            self.abort(&id)?;
        }
        let total: u64 = request.files.iter().map(|f| f.size).sum();
        self.reserve_memory(&session_id, total)?;
        let specs: Vec<(FileName, u64)> = request
            .files
            .iter()
            .map(|f| (f.name.clone(), f.size))
            .collect();
        let memory = Arc::clone(&self.memory);
        let id = session_id.clone();
        let staged = tokio::task::spawn_blocking(move || memory.stage(&id, &specs)).await?;
        let paths = match staged {
            Ok(paths) => paths,
            Err(e) => {
                self.memory.discard_staged(&session_id)?;
                return Err(e);
            }
        };
        let files = request
            .files
            .iter()
            .zip(&paths)
            .map(|(f, p)| StagedFile {
                name: f.name.clone(),
                path: p.clone(),
                size: f.size,
            })
            .collect();
        {
            let mut sessions = lock(&self.sessions);
            if sessions.values().any(|s| &s.request.key == key) {
                drop(sessions);
                self.memory.discard_staged(&session_id)?;
                return Err(Error::Aborted(format!(
                    "shard {key} is being written by another session"
                )));
            }
            sessions.insert(
                session_id.clone(),
                Session {
                    request,
                    owner_pid,
                    paths,
                    opened: Instant::now(),
                    committing: false,
                },
            );
            self.metrics.open_sessions.set(sessions.len() as i64);
        }
        self.update_usage_metrics();
        Ok((session_id, files))
    }

    /// Reserves `bytes` in the memory tier, evicting the oldest shards the
    /// disk tier already holds when the tier is full.
    fn reserve_memory(&self, id: &str, bytes: u64) -> Result<()> {
        let mut shortfall = match self.memory.try_reserve(id, bytes) {
            Ok(()) => return Ok(()),
            Err(shortfall) => shortfall,
        };
        for _ in 0..3 {
            let candidates: Vec<EvictionCandidate<ShardKey>> = self
                .memory
                .shards()
                .iter()
                .map(|m| EvictionCandidate {
                    key: m.shard.clone(),
                    age_order: m.committed_unix_ms,
                    bytes: m.total_bytes(),
                    safe_to_drop: self.disk.contains(&m.shard),
                })
                .collect();
            let Ok(victims) = choose_pressure_victims(&candidates, shortfall) else {
                break;
            };
            for key in victims {
                if self.memory.evict(&key)? {
                    tracing::info!(shard = %key, "evicted from memory tier to make room");
                    self.metrics
                        .shards_evicted
                        .with_label_values(&["memory", "pressure"])
                        .inc();
                }
            }
            match self.memory.try_reserve(id, bytes) {
                Ok(()) => {
                    self.notify();
                    return Ok(());
                }
                Err(s) => shortfall = s,
            }
        }
        Err(Error::ResourceExhausted(self.memory_full_message(bytes)))
    }

    fn memory_full_message(&self, needed: u64) -> String {
        let usage = self.memory.usage();
        let mut by_job: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for m in self.memory.shards() {
            let entry = by_job
                .entry(format!("{}/{}", m.shard.tenant, m.shard.job))
                .or_default();
            entry.0 += m.total_bytes();
            if !self.disk.contains(&m.shard) {
                entry.1 += m.total_bytes();
            }
        }
        let jobs: Vec<String> = by_job
            .iter()
            .map(|(job, (bytes, unsafe_bytes))| {
                format!("{job}: {bytes} bytes ({unsafe_bytes} not yet on disk)")
            })
            .collect();
        format!(
            "memory tier is full: this save needs {needed} bytes but {} of {} bytes are in use \
             ({} reserved by {} open sessions; shards: {}); nothing more can be evicted until the disk tier holds it",
            usage.used,
            usage.capacity,
            usage.reserved,
            usage.staging_areas,
            if jobs.is_empty() {
                "none".into()
            } else {
                jobs.join(", ")
            }
        )
    }

    /// Commits a session: hashes its files in place, writes the manifest and
    /// makes the shard visible, then queues the write-back to disk.
    #[tracing::instrument(skip_all, fields(session = session_id))]
    pub async fn commit(&self, session_id: &str) -> Result<Arc<Manifest>> {
        let started = Instant::now();
        let (request, paths) = {
            let mut sessions = lock(&self.sessions);
            let session = sessions
                .get_mut(session_id)
                .ok_or_else(|| unknown_session(session_id))?;
            if session.committing {
                return Err(Error::FailedPrecondition(format!(
                    "session {session_id} is already being committed"
                )));
            }
            session.committing = true;
            (session.request.clone(), session.paths.clone())
        };
        let result = self.commit_session(session_id, &request, paths).await;
        let mut sessions = lock(&self.sessions);
        match &result {
            // A bad file size is the client's to fix: the session stays open.
            Err(Error::InvalidArgument(_)) => {
                if let Some(s) = sessions.get_mut(session_id) {
                    s.committing = false;
                }
            }
            _ => {
                sessions.remove(session_id);
            }
        }
        self.metrics.open_sessions.set(sessions.len() as i64);
        drop(sessions);
        if let Err(e) = &result
            && !matches!(e, Error::InvalidArgument(_))
        {
            let _ = self.memory.discard_staged(session_id);
        }
        let manifest = result?;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .saved_bytes
            .with_label_values(&["memory"])
            .inc_by(manifest.total_bytes());
        tracing::info!(
            shard = %manifest.shard,
            bytes = manifest.total_bytes(),
            chunks = manifest.chunk_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard committed"
        );
        self.queue_writeback(manifest.shard.clone());
        self.update_usage_metrics();
        self.notify();
        Ok(manifest)
    }

    async fn commit_session(
        &self,
        session_id: &str,
        request: &BeginShard,
        paths: Vec<PathBuf>,
    ) -> Result<Arc<Manifest>> {
        let files: Vec<(String, PathBuf, u64)> = request
            .files
            .iter()
            .zip(paths)
            .map(|(f, p)| (f.name.as_str().to_owned(), p, f.size))
            .collect();
        let chunk_size = self.config.chunk_size;
        crash_point("commit.before_hash");
        let chunks =
            tokio::task::spawn_blocking(move || hashing::hash_files(&files, chunk_size)).await??;
        crash_point("commit.after_hash");
        let manifest = Arc::new(Manifest {
            version: MANIFEST_VERSION,
            shard: request.key.clone(),
            world_size: request.world_size,
            chunk_size,
            files: request
                .files
                .iter()
                .zip(chunks)
                .map(|(f, chunks)| FileEntry {
                    name: f.name.clone(),
                    size: f.size,
                    chunks,
                    metadata: f.metadata.clone(),
                })
                .collect(),
            metadata: request.metadata.clone(),
            committed_unix_ms: now_ms(),
        });
        let memory = Arc::clone(&self.memory);
        let id = session_id.to_owned();
        let m = Arc::clone(&manifest);
        tokio::task::spawn_blocking(move || memory.commit_staged(&id, m)).await??;
        crash_point("commit.before_ack");
        Ok(manifest)
    }

    /// Drops a session and its files; unknown sessions are fine (idempotent).
    pub fn abort(&self, session_id: &str) -> Result<()> {
        let removed = {
            let mut sessions = lock(&self.sessions);
            let removed = sessions.remove(session_id);
            self.metrics.open_sessions.set(sessions.len() as i64);
            removed
        };
        if let Some(session) = removed {
            tracing::info!(shard = %session.request.key, session = session_id, "session aborted");
            self.memory.discard_staged(session_id)?;
            self.update_usage_metrics();
        }
        Ok(())
    }

    async fn reap_sessions(self: Arc<Self>) {
        let period = (self.config.session_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let stale: Vec<String> = lock(&self.sessions)
                .iter()
                .filter(|(_, s)| {
                    !s.committing
                        && (s.opened.elapsed() > self.config.session_timeout
                            || s.owner_pid.is_some_and(|p| !process_alive(p)))
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in stale {
                tracing::warn!(session = %id, "aborting save session: its writer exited or it outlived session_timeout_secs");
                if let Err(e) = self.abort(&id) {
                    tracing::warn!(session = %id, error = %e, "aborting stale session failed");
                }
            }
        }
    }

    // ----- write-back and retention ----------------------------------------

    fn queue_writeback(&self, key: ShardKey) {
        lock(&self.writeback).insert(key.clone(), DiskState::Pending);
        self.metrics.writeback_pending.inc();
        let _ = self.writeback_tx.send(key);
    }

    async fn writeback_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<ShardKey>) {
        loop {
            let key = tokio::select! {
                () = self.cancel.cancelled() => return,
                key = rx.recv() => match key { Some(k) => k, None => return },
            };
            self.write_back(&key).await;
            self.metrics.writeback_pending.dec();
            self.apply_retention(&key.tenant, &key.job).await;
        }
    }

    #[tracing::instrument(skip_all, fields(shard = %key))]
    async fn write_back(&self, key: &ShardKey) {
        let Ok(Some(manifest)) = self.memory.manifest(key).await else {
            lock(&self.writeback).remove(key);
            return;
        };
        let started = Instant::now();
        let mut delay = WRITEBACK_RETRY_DELAY;
        let mut attempt = 1;
        let outcome = loop {
            let result = {
                let _gc = self.gc_lock.read().await;
                transfer::copy_shard(
                    &manifest,
                    &*self.memory,
                    &*self.disk,
                    self.config.writeback_concurrency,
                )
                .await
            };
            match result {
                Ok(report) => break Ok(report),
                Err(e) if attempt < WRITEBACK_ATTEMPTS && !self.cancel.is_cancelled() => {
                    tracing::warn!(error = %e, attempt, "write-back to disk failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => break Err(e),
            }
        };
        match outcome {
            Ok(report) => {
                crash_point("writeback.after_manifest");
                self.metrics
                    .writeback_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .saved_bytes
                    .with_label_values(&["disk"])
                    .inc_by(report.bytes_written);
                self.metrics
                    .dedup_skipped_bytes
                    .with_label_values(&["disk"])
                    .inc_by(report.bytes_skipped);
                tracing::info!(
                    written = report.bytes_written,
                    deduplicated = report.bytes_skipped,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "shard durable on disk"
                );
                lock(&self.writeback).remove(key);
            }
            Err(e) => {
                tracing::error!(error = %e, "write-back to disk failed; the shard stays in memory only");
                self.metrics
                    .writeback_failures
                    .with_label_values(&["disk"])
                    .inc();
                lock(&self.writeback).insert(key.clone(), DiskState::Failed(e.to_string()));
            }
        }
        self.update_usage_metrics();
        self.notify();
    }

    /// Applies both tiers' retention to one job.
    async fn apply_retention(&self, tenant: &TenantName, job: &JobName) {
        let _gc = self.gc_lock.write().await;
        let mut changed = false;
        // Memory: a step may go once the disk tier holds every shard of it.
        let in_memory = self
            .memory
            .list(tenant, Some(job))
            .await
            .unwrap_or_default();
        let residency = group_steps(&in_memory, |m| self.disk.contains(&m.shard));
        for step in self.config.memory_retention.steps_to_evict(&residency) {
            for m in in_memory.iter().filter(|m| m.shard.step == step) {
                match self.memory.evict(&m.shard) {
                    Ok(true) => {
                        changed = true;
                        self.metrics
                            .shards_evicted
                            .with_label_values(&["memory", "retention"])
                            .inc();
                        tracing::info!(shard = %m.shard, "evicted from memory tier by retention");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(shard = %m.shard, error = %e, "evicting from memory tier failed")
                    }
                }
            }
        }
        // Disk: the slowest local tier; a step still in memory stays, so that
        // memory can always drop it later.
        let on_disk = self.disk.list(tenant, Some(job)).await.unwrap_or_default();
        let residency = group_steps(&on_disk, |m| !self.memory.contains(&m.shard));
        let mut removed_from_disk = false;
        for step in self.config.disk_retention.steps_to_evict(&residency) {
            for m in on_disk.iter().filter(|m| m.shard.step == step) {
                match self.disk.remove_shard(&m.shard) {
                    Ok(true) => {
                        removed_from_disk = true;
                        self.metrics
                            .shards_evicted
                            .with_label_values(&["disk", "retention"])
                            .inc();
                        tracing::info!(shard = %m.shard, "evicted from disk tier by retention");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(shard = %m.shard, error = %e, "evicting from disk tier failed")
                    }
                }
            }
        }
        if removed_from_disk {
            changed = true;
            let disk = Arc::clone(&self.disk);
            match tokio::task::spawn_blocking(move || disk.collect_garbage(false)).await {
                Ok(Ok(report)) => tracing::debug!(
                    chunks = report.chunks,
                    bytes = report.bytes,
                    "removed unreferenced chunks"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "collecting unreferenced chunks failed"),
                Err(e) => tracing::warn!(error = %e, "collecting unreferenced chunks panicked"),
            }
        }
        if changed {
            self.update_usage_metrics();
            self.notify();
        }
    }

    /// Refreshes the tier usage gauges.
    pub fn update_usage_metrics(&self) {
        let usage = self.memory.usage();
        let used = &self.metrics.tier_used_bytes;
        used.with_label_values(&["memory"]).set(usage.used as i64);
        self.metrics.memory_pool_bytes.set(usage.pool as i64);
        used.with_label_values(&["disk"])
            .set(self.disk.used_bytes() as i64);
        self.metrics
            .tier_capacity_bytes
            .with_label_values(&["memory"])
            .set(usage.capacity as i64);
        self.metrics
            .tier_capacity_bytes
            .with_label_values(&["disk"])
            .set(0);
    }

    // ----- listing ---------------------------------------------------------

    async fn all_shards(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<BTreeMap<ShardKey, Arc<Manifest>>> {
        let mut all = BTreeMap::new();
        for source in self.sources().into_iter().rev() {
            for m in source.list(tenant, job).await? {
                all.insert(m.shard.clone(), m);
            }
        }
        Ok(all)
    }

    /// Steps of one job (or every job of the tenant), with each shard's state.
    pub async fn list_steps(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<BTreeMap<JobName, Vec<StepView>>> {
        let all = self.all_shards(tenant, job).await?;
        let memory_keys: std::collections::BTreeSet<ShardKey> = self
            .memory
            .list(tenant, job)
            .await?
            .iter()
            .map(|m| m.shard.clone())
            .collect();
        let writeback = lock(&self.writeback).clone();
        let mut jobs: BTreeMap<JobName, BTreeMap<Step, Vec<ShardView>>> = BTreeMap::new();
        for (key, m) in &all {
            let disk = if self.disk.contains(key) {
                DiskState::Durable
            } else {
                writeback.get(key).cloned().unwrap_or(DiskState::Absent)
            };
            jobs.entry(key.job.clone())
                .or_default()
                .entry(key.step)
                .or_default()
                .push(ShardView {
                    rank: key.rank,
                    total_bytes: m.total_bytes(),
                    world_size: m.world_size,
                    in_memory: memory_keys.contains(key),
                    disk,
                });
        }
        Ok(jobs
            .into_iter()
            .map(|(job, steps)| {
                let views = steps
                    .into_iter()
                    .map(|(step, shards)| {
                        let present = shards.iter().map(|s| (step, s.rank, s.world_size));
                        let restorable = latest_complete_step(present, None) == Some(step);
                        StepView {
                            step,
                            restorable,
                            shards,
                        }
                    })
                    .collect();
                (job, views)
            })
            .collect())
    }

    /// The newest step of a job complete in some local tier (for `rank`, or
    /// for every rank when the shards declare a world size).
    pub async fn latest_step(
        &self,
        tenant: &TenantName,
        job: &JobName,
        rank: Option<Rank>,
    ) -> Result<Option<Step>> {
        let all = self.all_shards(tenant, Some(job)).await?;
        Ok(latest_complete_step(
            all.values()
                .map(|m| (m.shard.step, m.shard.rank, m.world_size)),
            rank,
        ))
    }

    /// Resolves "this step, or the newest complete one".
    pub async fn resolve_step(
        &self,
        tenant: &TenantName,
        job: &JobName,
        step: Option<Step>,
        rank: Rank,
    ) -> Result<Step> {
        match step {
            Some(step) => Ok(step),
            None => self.latest_step(tenant, job, Some(rank)).await?.ok_or_else(|| {
                Error::NotFound(format!("job {job} of tenant {tenant} has no complete step for rank {rank} on this node"))
            }),
        }
    }

    /// Reads one chunk from the fastest tier with a verified copy.
    pub async fn read_chunk(&self, location: &ChunkLocation) -> Result<bytes::Bytes> {
        let (_, bytes, _) =
            transfer::read_first_verified(location, &self.sources(), &self.metrics).await?;
        Ok(bytes)
    }

    /// A committed shard's manifest, from whichever tier has it.
    pub async fn manifest(&self, key: &ShardKey) -> Result<Arc<Manifest>> {
        for source in self.sources() {
            if let Some(m) = source.manifest(key).await? {
                return Ok(m);
            }
        }
        Err(Error::NotFound(format!(
            "shard {key} is in no tier of this node"
        )))
    }

    // ----- restore ---------------------------------------------------------

    /// Makes a shard readable in the memory tier and returns its paths.
    ///
    /// If the memory tier has the shard, its chunks are re-hashed (unless
    /// `verify` is off) and any bad chunk is rewritten in place from the disk
    /// tier. Otherwise the shard is assembled in a staging area from the disk
    /// tier, every chunk verified, and committed into the memory tier.
    #[tracing::instrument(skip_all, fields(shard = %key))]
    pub async fn restore(&self, key: &ShardKey, verify: bool) -> Result<RestoreOutcome> {
        let started = Instant::now();
        let _gc = self.gc_lock.read().await;
        let outcome = match self.memory.manifest(key).await? {
            Some(manifest) => self.restore_in_memory(manifest, verify).await?,
            None => self.refill_memory(key).await?,
        };
        // The caller may map these files from now on: never recycle them.
        self.memory.mark_exported(key);
        for (tier, bytes) in &outcome.bytes_by_tier {
            self.metrics
                .restored_bytes
                .with_label_values(&[tier.as_str()])
                .inc_by(*bytes);
        }
        self.metrics
            .restore_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            bytes = outcome.manifest.total_bytes(),
            sources = ?outcome.bytes_by_tier,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard restored"
        );
        Ok(outcome)
    }

    async fn restore_in_memory(
        &self,
        manifest: Arc<Manifest>,
        verify: bool,
    ) -> Result<RestoreOutcome> {
        let paths = self.memory.file_paths(&manifest);
        let mut bytes_by_tier = BTreeMap::from([(TierKind::Memory, manifest.total_bytes())]);
        if !verify {
            return Ok(RestoreOutcome {
                manifest,
                paths,
                bytes_by_tier,
            });
        }
        let (m, p) = (Arc::clone(&manifest), paths.clone());
        let bad = tokio::task::spawn_blocking(move || hashing::find_bad_chunks(&m, &p, &|_| ()))
            .await??;
        if bad.is_empty() {
            return Ok(RestoreOutcome {
                manifest,
                paths,
                bytes_by_tier,
            });
        }
        self.metrics
            .chunk_verify_failures
            .with_label_values(&["memory"])
            .inc_by(bad.len() as u64);
        tracing::warn!(
            bad_chunks = bad.len(),
            "memory tier copy failed verification, repairing from disk"
        );
        let wanted: Vec<ChunkLocation> = bad
            .iter()
            .map(|b| ChunkLocation {
                manifest: Arc::clone(&manifest),
                file_index: b.file_index,
                offset: b.offset,
                chunk: b.chunk,
            })
            .collect();
        let files = open_for_write(&paths)?;
        let report = transfer::fill_chunks(
            wanted,
            &[&*self.disk],
            &[],
            &files,
            self.config.writeback_concurrency,
            &self.metrics,
        )
        .await?;
        self.metrics
            .chunks_repaired
            .with_label_values(&["memory"])
            .inc_by(bad.len() as u64);
        let repaired: u64 = report.bytes_by_tier.values().sum();
        *bytes_by_tier.entry(TierKind::Memory).or_default() -= repaired;
        merge(&mut bytes_by_tier, &report);
        Ok(RestoreOutcome {
            manifest,
            paths,
            bytes_by_tier,
        })
    }

    async fn refill_memory(&self, key: &ShardKey) -> Result<RestoreOutcome> {
        let manifest =
            self.disk.manifest(key).await?.ok_or_else(|| {
                Error::NotFound(format!("shard {key} is in no tier of this node"))
            })?;
        let id = format!("restore-{}", uuid::Uuid::new_v4());
        self.reserve_memory(&id, manifest.total_bytes())?;
        let result = self.refill_staged(&id, &manifest).await;
        if result.is_err() {
            let _ = self.memory.discard_staged(&id);
        }
        let report = result?;
        let mut bytes_by_tier = BTreeMap::new();
        merge(&mut bytes_by_tier, &report);
        self.update_usage_metrics();
        self.notify();
        Ok(RestoreOutcome {
            paths: self.memory.file_paths(&manifest),
            manifest,
            bytes_by_tier,
        })
    }

    async fn refill_staged(&self, id: &str, manifest: &Arc<Manifest>) -> Result<FillReport> {
        let specs: Vec<(FileName, u64)> = manifest
            .files
            .iter()
            .map(|f| (f.name.clone(), f.size))
            .collect();
        let paths = self.memory.stage(id, &specs)?;
        let files = open_for_write(&paths)?;
        let report = transfer::fill_chunks(
            ChunkLocation::all(manifest),
            &[&*self.disk],
            &[],
            &files,
            self.config.writeback_concurrency,
            &self.metrics,
        )
        .await?;
        drop(files);
        let memory = Arc::clone(&self.memory);
        let (id, m) = (id.to_owned(), Arc::clone(manifest));
        tokio::task::spawn_blocking(move || memory.commit_staged(&id, m)).await??;
        Ok(report)
    }

    // ----- delete, wait, verify, gc, status --------------------------------

    /// Deletes every shard of a step from both tiers.
    pub async fn delete_step(&self, tenant: &TenantName, job: &JobName, step: Step) -> Result<u32> {
        let _gc = self.gc_lock.write().await;
        let shards: Vec<ShardKey> = self
            .all_shards(tenant, Some(job))
            .await?
            .into_keys()
            .filter(|k| k.step == step)
            .collect();
        if shards.is_empty() {
            return Err(Error::NotFound(format!(
                "job {job} of tenant {tenant} has no step {step} on this node"
            )));
        }
        for key in &shards {
            if self.memory.evict(key)? {
                self.metrics
                    .shards_evicted
                    .with_label_values(&["memory", "delete"])
                    .inc();
            }
            if self.disk.remove_shard(key)? {
                self.metrics
                    .shards_evicted
                    .with_label_values(&["disk", "delete"])
                    .inc();
            }
            lock(&self.writeback).remove(key);
        }
        let disk = Arc::clone(&self.disk);
        tokio::task::spawn_blocking(move || disk.collect_garbage(false)).await??;
        tracing::info!(%tenant, %job, %step, shards = shards.len(), "step deleted");
        self.update_usage_metrics();
        self.notify();
        Ok(shards.len() as u32)
    }

    /// Waits until every shard of the step (or one rank) on this node is
    /// durable in `tier`, or `timeout` passes.
    pub async fn wait_durable(
        &self,
        selection: &StepSelection,
        tier: TierKind,
        timeout: Duration,
    ) -> Result<()> {
        let StepSelection {
            tenant,
            job,
            step,
            rank,
        } = selection;
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let shards: Vec<ShardKey> = self
                .all_shards(tenant, Some(job))
                .await?
                .into_keys()
                .filter(|k| selection.matches(k))
                .collect();
            if shards.is_empty() {
                return Err(Error::NotFound(format!(
                    "job {job} of tenant {tenant} has no committed shard of step {step}{} on this node",
                    rank.map(|r| format!(" rank {r}")).unwrap_or_default()
                )));
            }
            let mut pending = 0;
            for key in &shards {
                if tier == TierKind::Memory || self.disk.contains(key) {
                    continue;
                }
                if let Some(DiskState::Failed(e)) = lock(&self.writeback).get(key) {
                    return Err(Error::Aborted(format!(
                        "shard {key} will not become durable on disk: {e}"
                    )));
                }
                pending += 1;
            }
            if pending == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(Error::DeadlineExceeded(format!(
                    "step {step} of job {job}: {pending} of {} shards not yet durable in the {tier} tier after {} ms",
                    shards.len(),
                    timeout.as_millis()
                )));
            }
        }
    }

    /// Re-reads every chunk of the step's shards in `tier`, reporting bad
    /// ones (and rewriting them from the other tier when `repair` is set).
    /// `progress(done, total)` is called as bytes are checked.
    pub async fn verify(
        &self,
        selection: &StepSelection,
        tier: TierKind,
        repair: bool,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Vec<VerifyFinding>> {
        let StepSelection {
            tenant, job, step, ..
        } = selection;
        let _gc = self.gc_lock.read().await;
        let (target, others): (&dyn ShardSource, &dyn ShardSource) = match tier {
            TierKind::Memory => (&*self.memory, &*self.disk),
            TierKind::Disk => (&*self.disk, &*self.memory),
            TierKind::ObjectStore => {
                return Err(Error::InvalidArgument(
                    "verify of the object-store tier is not available on this node yet".into(),
                ));
            }
        };
        let manifests: Vec<Arc<Manifest>> = target
            .list(tenant, Some(job))
            .await?
            .into_iter()
            .filter(|m| selection.matches(&m.shard))
            .collect();
        if manifests.is_empty() {
            return Err(Error::NotFound(format!(
                "the {tier} tier holds no shard of step {step} of job {job}"
            )));
        }
        let locations: Vec<ChunkLocation> = manifests.iter().flat_map(ChunkLocation::all).collect();
        let total: u64 = locations.iter().map(|l| l.chunk.len).sum();
        let done = std::sync::atomic::AtomicU64::new(0);
        let checked: Vec<(ChunkLocation, Result<ChunkRead>)> = stream::iter(locations)
            .map(|location| {
                let done = &done;
                async move {
                    let result = target.read_chunk(&location).await;
                    let now = done
                        .fetch_add(location.chunk.len, std::sync::atomic::Ordering::Relaxed)
                        + location.chunk.len;
                    progress(now, total);
                    (location, result)
                }
            })
            .buffer_unordered(self.config.writeback_concurrency)
            .collect()
            .await;
        let mut findings = Vec::new();
        for (location, result) in checked {
            let problem = match result {
                Ok(ChunkRead::Verified(_)) => continue,
                Ok(ChunkRead::Missing) => "missing".to_owned(),
                Ok(ChunkRead::Corrupt) => {
                    self.metrics
                        .chunk_verify_failures
                        .with_label_values(&[tier.as_str()])
                        .inc();
                    "corrupt".to_owned()
                }
                Err(e) => e.to_string(),
            };
            tracing::warn!(tier = %tier, shard = %location.shard(), file = location.file_name(), offset = location.offset, chunk = %location.chunk.id, %problem, "verify found a bad chunk");
            let repaired = repair && self.repair_chunk(tier, &location, others).await;
            findings.push(VerifyFinding {
                rank: location.shard().rank,
                file: location.file_name().to_owned(),
                offset: location.offset,
                chunk: location.chunk.id,
                problem,
                repaired,
            });
        }
        Ok(findings)
    }

    async fn repair_chunk(
        &self,
        tier: TierKind,
        location: &ChunkLocation,
        from: &dyn ShardSource,
    ) -> bool {
        let bytes = match transfer::read_first_verified(location, &[from], &self.metrics).await {
            Ok((_, bytes, _)) => bytes,
            Err(e) => {
                tracing::warn!(chunk = %location.chunk.id, error = %e, "cannot repair: no good copy elsewhere");
                return false;
            }
        };
        let result = match tier {
            TierKind::Memory => {
                let memory = Arc::clone(&self.memory);
                let location = location.clone();
                tokio::task::spawn_blocking(move || memory.write_chunk_in_place(&location, &bytes))
                    .await
                    .map_err(Error::from)
                    .and_then(|r| r)
            }
            TierKind::Disk => {
                self.disk
                    .put_chunk(&location.shard().tenant, location.chunk.id, bytes)
                    .await
            }
            TierKind::ObjectStore => Err(Error::InvalidArgument(
                "verify of the object-store tier is not available on this node yet".into(),
            )),
        };
        match result {
            Ok(()) => {
                self.metrics
                    .chunks_repaired
                    .with_label_values(&[tier.as_str()])
                    .inc();
                tracing::info!(tier = %tier, chunk = %location.chunk.id, source = %from.kind(), "chunk repaired");
                true
            }
            Err(e) => {
                tracing::warn!(tier = %tier, chunk = %location.chunk.id, error = %e, "repair failed");
                false
            }
        }
    }

    /// Removes unreferenced disk chunks (or counts them, on a dry run).
    pub async fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let _gc = self.gc_lock.write().await;
        let disk = Arc::clone(&self.disk);
        let report = tokio::task::spawn_blocking(move || disk.collect_garbage(dry_run)).await??;
        tracing::info!(
            dry_run,
            chunks = report.chunks,
            bytes = report.bytes,
            "garbage collection"
        );
        self.update_usage_metrics();
        Ok(report)
    }

    /// Usage of each tier.
    pub fn tier_status(&self) -> Vec<TierStatus> {
        let usage = self.memory.usage();
        vec![
            TierStatus {
                tier: TierKind::Memory,
                path: self.memory.root().to_path_buf(),
                used: usage.used,
                capacity: usage.capacity,
                shards: usage.shards as u64,
            },
            TierStatus {
                tier: TierKind::Disk,
                path: self.disk.root().to_path_buf(),
                used: self.disk.used_bytes(),
                capacity: 0,
                shards: self.disk.shards().len() as u64,
            },
        ]
    }

    /// Open sessions and pending write-backs.
    pub fn activity(&self) -> (usize, usize) {
        let pending = lock(&self.writeback)
            .values()
            .filter(|s| **s == DiskState::Pending)
            .count();
        (lock(&self.sessions).len(), pending)
    }
}

/// Rejects a file list that names a file twice, or names a file and also a
/// file inside it as a directory (`a` and `a/b`): both would collide on disk.
/// Linear in the number of files times their depth.
fn check_file_names(files: &[FileSpec]) -> Result<()> {
    let mut names = std::collections::HashSet::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        if !names.insert(f.name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "files[{i}].name {} is listed twice",
                f.name
            )));
        }
    }
    for f in files {
        let name = f.name.as_str();
        for (cut, _) in name.match_indices('/') {
            if names.contains(&name[..cut]) {
                return Err(Error::InvalidArgument(format!(
                    "files: {} is both a file and the directory of {name}",
                    &name[..cut]
                )));
            }
        }
    }
    Ok(())
}

/// Whether a process with this id exists (in cairnd's pid namespace, which
/// is the one Unix socket credentials are reported in).
fn process_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn unknown_session(id: &str) -> Error {
    Error::FailedPrecondition(format!(
        "session {id:?} is not open (never begun, already committed, or aborted)"
    ))
}

/// Opens existing files for writing in place (staged or committed files).
pub(crate) fn open_for_write(paths: &[PathBuf]) -> Result<Vec<Arc<std::fs::File>>> {
    use crate::error::IoContext;
    paths
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(Arc::new)
                .io_context(|| format!("opening {}", p.display()))
        })
        .collect()
}

fn merge(into: &mut BTreeMap<TierKind, u64>, report: &FillReport) {
    for (tier, bytes) in &report.bytes_by_tier {
        *into.entry(*tier).or_default() += bytes;
    }
}

/// Groups shards by step; a step is safe to drop when `safe` holds for all
/// of its shards.
fn group_steps(
    manifests: &[Arc<Manifest>],
    safe: impl Fn(&Manifest) -> bool,
) -> Vec<StepResidency> {
    let mut steps: BTreeMap<Step, bool> = BTreeMap::new();
    for m in manifests {
        let entry = steps.entry(m.shard.step).or_insert(true);
        *entry &= safe(m);
    }
    steps
        .into_iter()
        .map(|(step, safe_to_drop)| StepResidency { step, safe_to_drop })
        .collect()
}
