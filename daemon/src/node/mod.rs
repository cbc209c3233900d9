//! The node: sessions, commits, write-back, replication, uploads, retention
//! and restore over every tier.
//!
//! This is where the save and restore paths of `ARCHITECTURE.md` live. The
//! gRPC services translate messages into the calls below and nothing else;
//! the tiers know their own layout and nothing of each other. The node owns
//! the rules that span tiers:
//!
//! * a shard is acknowledged once committed in the memory tier, then written
//!   back to the disk tier, replicated to peers and uploaded to the bucket by
//!   background workers, each reporting when it is durable there;
//! * a step leaves the memory tier (retention or pressure) only once the disk
//!   tier holds every shard of it;
//! * chunks are removed from the disk tier only under the write side of
//!   `gc_lock`, which copies into and restores from the disk tier hold for
//!   reading, so collection never races a copy between its chunks and its
//!   manifest.

mod attempts;
mod background;
mod holder_check;
mod ingest;
mod listing;
pub use listing::StepsView;
mod maintenance;
mod pipeline;
pub use pipeline::PipelineCounts;
pub mod progress;
mod replicate;
mod restore;
mod save;
mod scrub;
mod upload;
pub mod volumes;
mod writeback;

pub use replicate::ReplicationView;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_core::{Attempt, FileName, JobName, Manifest, NodeId, Rank, ShardKey, Step, TenantName};
use tokio::sync::{RwLock, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, UPLOAD_JOURNAL_DIR};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::tier::disk::DiskTier;
use crate::tier::memory::MemoryTier;
use crate::tier::object::ObjectTier;
use crate::tier::peer::PeerTier;
use crate::tier::{ShardSource, TierKind};
use pipeline::Pipeline;
use upload::UploadJournal;

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
    /// The save of the step this shard belongs to, if the client named one.
    pub attempt: Option<Attempt>,
}

impl BeginShard {
    /// The declared sizes added up, or `INVALID_ARGUMENT` when they do not
    /// fit in 64 bits (they come from outside: a wrapped sum would reserve
    /// nothing for a huge save).
    pub fn total_bytes(&self) -> Result<u64> {
        self.files
            .iter()
            .try_fold(0u64, |total, f| total.checked_add(f.size))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "files: the declared sizes of shard {} add up to more than {} bytes",
                    self.key,
                    u64::MAX
                ))
            })
    }
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
    /// The files as cairnd sees them (in the tier, or in the pod's volume).
    paths: Vec<PathBuf>,
    /// For a session opened on a volume's socket: the volume and the files
    /// staged in it.
    volume: Option<(Arc<volumes::VolumeBinding>, Vec<volumes::VolumeStagedFile>)>,
    opened: Instant,
    committing: bool,
}

/// Where a shard stands in a tier it is copied into (disk, object store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    /// Not there and not queued.
    Absent,
    /// Queued or being written.
    Pending,
    /// Complete and durable.
    Durable,
    /// The last attempt failed with this error; another is scheduled.
    Failed(String),
    /// The pipeline has stopped retrying quickly (its attempts are spent, or
    /// the error is permanent): someone should look. Tried again only every
    /// `[pipelines.*] recheck_secs`, or after a restart.
    NeedsAttention(String),
}

impl CopyState {
    /// Why the copy failed, for a failed one.
    pub fn problem(&self) -> Option<&str> {
        match self {
            Self::Failed(why) | Self::NeedsAttention(why) => Some(why),
            Self::Absent | Self::Pending | Self::Durable => None,
        }
    }
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
    /// The attempt that saved it.
    pub attempt: Option<Attempt>,
    /// Whether the memory tier holds it.
    pub in_memory: bool,
    /// Its disk state.
    pub disk: CopyState,
    /// Its object-store state (`Absent` when no object store is configured).
    pub object_store: CopyState,
    /// Its peer-tier state (`None` without a peer tier).
    pub peers: Option<ReplicationView>,
}

/// One step as listed.
#[derive(Clone, Debug)]
pub struct StepView {
    /// The step.
    pub step: Step,
    /// Every rank's shard is complete in some tier this node can read.
    pub restorable: bool,
    /// The step's completion marker is in the object store: every rank's
    /// shard is durable there.
    pub object_store_complete: bool,
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
    /// For the peer tier, the holder whose copy is bad.
    pub holder: Option<NodeId>,
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
    /// T2, when configured.
    pub peers: Option<Arc<PeerTier>>,
    /// T3, when configured.
    pub object: Option<Arc<ObjectTier>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<String, Session>>,
    /// Which attempt of each recently saved step is current (see `attempts`).
    attempts: Mutex<attempts::StepAttempts>,
    /// Memory to disk.
    writeback: Pipeline,
    /// To the bucket, journaled (with an object store).
    upload: Option<Pipeline>,
    /// To peers (with a peer tier).
    replication: Option<Pipeline>,
    /// Who holds each replicated shard, and former holders to tell to drop
    /// their surplus copy.
    replicas: Mutex<replicate::Replicas>,
    changes: watch::Sender<u64>,
    /// What each restore source delivered lately, for the restore planner.
    source_rates: Mutex<HashMap<String, f64>>,
    /// Restores filling the memory tier now, with their progress.
    pub restores: progress::ActiveRestores,
    gc_lock: RwLock<()>,
    /// Every background task, so that shutdown can wait for them.
    background: background::Background,
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
    /// Opens the tiers, starts the write-back, replication and upload
    /// workers and the session reaper, and queues what a previous run left
    /// unfinished: write-back for shards the memory tier holds but the disk
    /// tier lacks, uploads from the journal, replication of every local
    /// shard.
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
        let disk = Arc::new(
            DiskTier::open(&config.disk_dir)?
                .with_reverify_after(config.disk_reverify_after)
                .with_capacity(config.disk_capacity),
        );
        let (object, upload) = match &config.object_store {
            Some(o) => {
                let tier = ObjectTier::open(
                    &o.url,
                    o.options.clone(),
                    o.settings.clone(),
                    Arc::clone(&metrics),
                )?
                .with_cancel(cancel.clone());
                let journal = UploadJournal::open(&config.disk_dir.join(UPLOAD_JOURNAL_DIR))?;
                tracing::info!(url = %o.url, upload_after = ?o.upload_after, "object-store tier enabled");
                let upload = Pipeline::new(
                    "upload",
                    config.pipelines.upload,
                    Some(Box::new(journal)),
                    Arc::clone(&metrics),
                    |metrics, counts| metrics.upload_pending.set(counts.outstanding() as i64),
                );
                (Some(Arc::new(tier)), Some(upload))
            }
            None => (None, None),
        };
        let peers = match &config.peers {
            Some(p) => Some(PeerTier::start(p, Arc::clone(&metrics), cancel.clone())?),
            None => None,
        };
        let writeback = Pipeline::new(
            "write-back",
            config.pipelines.write_back,
            None,
            Arc::clone(&metrics),
            |metrics, counts| metrics.writeback_pending.set(counts.outstanding() as i64),
        );
        let replication = peers.as_ref().map(|_| {
            Pipeline::new(
                "replication",
                config.pipelines.replication,
                None,
                Arc::clone(&metrics),
                |metrics, counts| {
                    metrics.replication_pending.set(counts.pending as i64);
                    metrics
                        .under_replicated_shards
                        .set(counts.outstanding() as i64);
                },
            )
        });
        let node = Arc::new(Self {
            config,
            memory,
            disk,
            peers,
            object,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            attempts: Mutex::new(attempts::StepAttempts::default()),
            writeback,
            upload,
            replication,
            replicas: Mutex::new(replicate::Replicas::default()),
            changes: watch::channel(0).0,
            source_rates: Mutex::new(HashMap::new()),
            restores: progress::ActiveRestores::default(),
            gc_lock: RwLock::new(()),
            background: background::Background::default(),
            cancel,
        });
        for manifest in node.memory.shards() {
            if !node.disk.contains(&manifest.shard) {
                node.queue_writeback(manifest.shard.clone());
            }
        }
        if let Some(upload) = &node.upload {
            upload.resume_from_journal();
        }
        node.background
            .spawn("write-back", Arc::clone(&node).writeback_loop());
        if node.object.is_some() {
            node.background
                .spawn("upload", Arc::clone(&node).upload_loop());
            node.background
                .spawn("bucket gc", Arc::clone(&node).bucket_gc_loop());
        }
        if node.peers.is_some() {
            node.background
                .spawn("replication", Arc::clone(&node).replication_loop());
            node.background
                .spawn("membership changes", Arc::clone(&node).membership_loop());
            node.background
                .spawn("holder checks", Arc::clone(&node).holder_check_loop());
        }
        node.background
            .spawn("disk scrub", Arc::clone(&node).disk_scrub_loop());
        node.background
            .spawn("session reaper", Arc::clone(&node).reap_sessions());
        node.background
            .spawn("ingest", ingest::run(Arc::clone(&node)));
        node.update_usage_metrics();
        Ok(node)
    }

    /// Waits, after the node's cancellation token fired, up to `deadline`
    /// for its background tasks to stop, and logs those that did not (the
    /// upload journal and the requeue at start resume their work).
    pub async fn drain(&self, deadline: Duration) {
        let left = self.background.drain(deadline).await;
        if left.is_empty() {
            tracing::info!("background tasks stopped");
        } else {
            let left: Vec<String> = left
                .iter()
                .map(|(name, n)| format!("{name} ×{n}"))
                .collect();
            tracing::warn!(
                deadline_s = deadline.as_secs_f64(),
                left = %left.join(", "),
                "background tasks still running at the shutdown deadline; stopping anyway"
            );
        }
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
        // Receivers wake on the send, whatever the value: saturating is fine.
        self.changes.send_modify(|n| *n = n.saturating_add(1));
    }

    /// Every tier this node reads from, fastest first.
    fn sources(&self) -> Vec<&dyn ShardSource> {
        let mut sources: Vec<&dyn ShardSource> = vec![&*self.memory, &*self.disk];
        if let Some(peers) = &self.peers {
            sources.push(&**peers);
        }
        if let Some(object) = &self.object {
            sources.push(&**object);
        }
        sources
    }

    /// The tiers below memory, fastest first: what refills and repairs the
    /// memory tier.
    fn slower_sources(&self) -> Vec<&dyn ShardSource> {
        self.sources().split_off(1)
    }
}
