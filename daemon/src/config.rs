//! Configuration: a TOML file, environment variables and flags, parsed into
//! one validated [`Config`].
//!
//! Precedence: flag > environment variable > file > default. Every option is
//! documented in `docs/configuration.md`; defaults are the named constants
//! below.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_core::codec::CompressionPolicy;
use cairn_core::ingest::CommitPolicy;
use cairn_core::tenancy::{MemoryQuotas, TenantMap};
use cairn_core::{ChunkSize, DEFAULT_CHUNK_SIZE, NodeId, RetentionPolicy, TenantName};
use clap::Parser;
use serde::Deserialize;

use crate::membership::MembershipConfig;
use crate::retry::{PipelinePolicy, RetryPolicy};
use crate::tier::object::ObjectTierSettings;
use crate::tier::peer::PeerConfig;
use crate::tier::peer::tls::TlsFiles;

/// Default client socket.
pub const DEFAULT_SOCKET: &str = "/run/cairn/cairn.sock";
/// Default memory-tier directory.
pub const DEFAULT_MEMORY_DIR: &str = "/dev/shm/cairn";
/// Default disk-tier directory.
pub const DEFAULT_DISK_DIR: &str = "/var/lib/cairn";
/// Default tenant outside Kubernetes.
pub const DEFAULT_TENANT: &str = "default";
/// Default Prometheus listen address.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
/// Default steps kept per job in the memory tier.
pub const DEFAULT_MEMORY_KEEP_LAST: usize = 2;
/// Default time a disk chunk stays trusted after it was written or checked
/// (see `DiskTier::missing_chunks`).
pub const DEFAULT_DISK_REVERIFY_AFTER_SECS: u64 = 600;
/// Default steps kept per job in the disk tier.
pub const DEFAULT_DISK_KEEP_LAST: usize = 3;
/// Default share of the memory tier's filesystem Cairn may use.
pub const DEFAULT_MEMORY_FRACTION: f64 = 0.5;
/// Default share of the disk tier's filesystem Cairn may use for its own
/// shards (the rest is headroom for replicas, indexes and other users).
pub const DEFAULT_DISK_FRACTION: f64 = 0.8;
/// Default share of the memory tier's capacity kept as recycled files.
pub const DEFAULT_POOL_FRACTION: u64 = 4;
/// Default time after which an idle save session is aborted.
pub const DEFAULT_SESSION_TIMEOUT_SECS: u64 = 600;
/// Default time a save session may go without a write to its files.
pub const DEFAULT_SESSION_IDLE_TIMEOUT_SECS: u64 = 60;
/// Open save sessions one client process may hold at once.
pub const MAX_SESSIONS_PER_CLIENT: usize = 64;
/// Open save sessions one tenant may hold at once, over all its clients.
pub const MAX_SESSIONS_PER_TENANT: usize = 512;
/// Default chunks copied at once by a write-back.
pub const DEFAULT_WRITEBACK_CONCURRENCY: usize = 4;
/// Default chunks uploaded at once per shard: object stores answer each
/// request slowly but many at once (at most this many chunks, raw and
/// compressed, are in memory).
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 16;
/// Default complete steps per job kept in the object store.
pub const DEFAULT_OBJECT_KEEP_LAST: usize = 5;
/// Default interval of the bucket's garbage collection: daily, since every
/// daemon that collects lists the whole bucket (large clusters turn it off
/// on most nodes, or run `cairn gc` from one place).
pub const DEFAULT_GC_INTERVAL_SECS: u64 = 24 * 3600;
/// The smallest part S3 accepts in a multipart upload (but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// Where, under the disk tier, the local index of the bucket's chunks lives.
pub const OBJECT_INDEX_DIR: &str = "object-store-index";
/// Where, under the disk tier, the upload journal lives.
pub const UPLOAD_JOURNAL_DIR: &str = "upload-journal";
/// Where, under the memory tier, the CSI plugin's volumes live by default
/// (the plugin's `--volumes-dir` default is `/dev/shm/cairn/volumes`).
pub const DEFAULT_VOLUMES_SUBDIR: &str = "volumes";
/// Default interval of ingest's safety-net rescan of the volumes.
pub const DEFAULT_INGEST_RESCAN_SECS: u64 = 10;
/// Default port of the peer service, on every node.
pub const DEFAULT_PEER_PORT: u16 = 7070;
/// Default replicas of each shard on other nodes.
pub const DEFAULT_PEER_REPLICAS: usize = 1;
/// Most replicas accepted: each costs a full copy of every checkpoint.
pub const MAX_PEER_REPLICAS: usize = 8;
/// Default chunks sent at once to one peer (at most this many chunks per
/// replica copy are in memory).
pub const DEFAULT_PEER_CONCURRENCY: usize = 8;
/// Default stall bound of one peer request.
pub const DEFAULT_PEER_REQUEST_TIMEOUT_SECS: u64 = 60;
/// Default steps of each job and rank kept as replicas for other nodes.
pub const DEFAULT_REPLICA_KEEP_LAST: usize = 2;
/// Where, under the disk tier, the replicas kept for other nodes live.
pub const REPLICA_SUBDIR: &str = "replicas";
/// Default interval between two checks of every holder of this node's
/// shards.
pub const DEFAULT_HOLDER_CHECK_INTERVAL_SECS: u64 = 60;
/// Default time a holder may stay unreachable before its copies stop
/// counting (a restart or a rolling update should not cost a re-copy).
pub const DEFAULT_HOLDER_GRACE_SECS: u64 = 120;
/// Longest interval, grace or timeout accepted in `[peers]`: a week.
pub const MAX_PEER_INTERVAL_SECS: u64 = 7 * 86_400;
/// Default most holder checks (one request each) per second.
pub const DEFAULT_HOLDER_CHECKS_PER_SEC: u32 = 50;
/// Default scrub rate of the replicas held for others: a full pass over
/// 1 TiB takes about a day (12 MiB/s, a few percent of one core).
pub const DEFAULT_SCRUB_BYTES_PER_SEC: u64 = 12 * 1024 * 1024;

/// Command-line flags; each also reads an environment variable.
#[derive(Debug, Parser, Default)]
#[command(
    name = "cairnd",
    version,
    about = "Cairn's node daemon: multi-tier checkpoint storage"
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name of this node (default: the host name).
    #[arg(long, env = "CAIRN_NODE_NAME")]
    pub node_name: Option<String>,
    /// Tenant used when a request names none.
    #[arg(long, env = "CAIRN_TENANT")]
    pub tenant: Option<String>,
    /// Unix socket for the client API.
    #[arg(long, env = "CAIRN_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Group (name or gid) allowed to use the socket; mode becomes 0660.
    #[arg(long, env = "CAIRN_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Optional TCP address for the client API (remote, streaming clients).
    #[arg(long, env = "CAIRN_TCP_ADDR")]
    pub tcp_addr: Option<SocketAddr>,
    /// Prometheus /metrics address; "off" disables it.
    #[arg(long, env = "CAIRN_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Memory tier (T0) directory, on tmpfs.
    #[arg(long, env = "CAIRN_MEMORY_DIR")]
    pub memory_dir: Option<PathBuf>,
    /// Memory tier capacity in bytes.
    #[arg(long, env = "CAIRN_MEMORY_CAPACITY")]
    pub memory_capacity: Option<u64>,
    /// Steps per job kept in the memory tier.
    #[arg(long, env = "CAIRN_MEMORY_KEEP_LAST")]
    pub memory_keep_last: Option<usize>,
    /// Disk tier (T1) directory.
    #[arg(long, env = "CAIRN_DISK_DIR")]
    pub disk_dir: Option<PathBuf>,
    /// Disk tier capacity in bytes.
    #[arg(long, env = "CAIRN_DISK_CAPACITY")]
    pub disk_capacity: Option<u64>,
    /// Steps per job kept in the disk tier.
    #[arg(long, env = "CAIRN_DISK_KEEP_LAST")]
    pub disk_keep_last: Option<usize>,
    /// Bytes per second the disk tier's chunks are re-hashed at in the
    /// background (0: no scrubbing).
    #[arg(long, env = "CAIRN_DISK_SCRUB_BYTES_PER_SEC")]
    pub disk_scrub_bytes_per_sec: Option<u64>,
    /// Object-store tier (T3) URL: s3://, gs://, az:// or file:///.
    #[arg(long, env = "CAIRN_OBJECT_STORE_URL")]
    pub object_store_url: Option<String>,
    /// Chunk size in bytes.
    #[arg(long, env = "CAIRN_CHUNK_SIZE")]
    pub chunk_size: Option<u64>,
    /// Address of the peer service (enables the peer tier with `[membership]`).
    #[arg(long, env = "CAIRN_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Replicas of each shard on other nodes.
    #[arg(long, env = "CAIRN_PEER_REPLICAS")]
    pub peer_replicas: Option<usize>,
    /// Peer traffic without TLS: anyone who reaches the port can read and
    /// write replicas. For tests and trusted networks only.
    #[arg(long, env = "CAIRN_INSECURE_PEERS")]
    pub insecure_peers: bool,
    /// This node's certificate (PEM), naming the node id.
    #[arg(long, env = "CAIRN_PEER_TLS_CERT")]
    pub peer_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "CAIRN_PEER_TLS_KEY")]
    pub peer_tls_key: Option<PathBuf>,
    /// The CA that signs every node's certificate (PEM).
    #[arg(long, env = "CAIRN_PEER_TLS_CA")]
    pub peer_tls_ca: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "CAIRN_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// The file format; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_name: Option<String>,
    tenant: Option<String>,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    tcp_addr: Option<SocketAddr>,
    metrics_addr: Option<String>,
    chunk_size: Option<u64>,
    session_timeout_secs: Option<u64>,
    session_idle_timeout_secs: Option<u64>,
    #[serde(default)]
    memory: RawMemory,
    #[serde(default)]
    disk: RawDisk,
    #[serde(default)]
    object_store: RawObjectStore,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    peers: RawPeers,
    membership: Option<MembershipConfig>,
    #[serde(default)]
    tenants: RawTenants,
    #[serde(default)]
    pipelines: RawPipelines,
}

/// `[pipelines.write_back]`, `[pipelines.upload]`, `[pipelines.replication]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipelines {
    #[serde(default)]
    write_back: RawPipeline,
    #[serde(default)]
    upload: RawPipeline,
    #[serde(default)]
    replication: RawPipeline,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    first_retry_ms: Option<u64>,
    max_retry_secs: Option<u64>,
    attempts: Option<u32>,
    recheck_secs: Option<u64>,
}

/// How each background pipeline retries (see `node::pipeline`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelinesConfig {
    /// Memory to disk.
    pub write_back: PipelinePolicy,
    /// Disk (or memory) to the object store.
    pub upload: PipelinePolicy,
    /// Local shards to peers.
    pub replication: PipelinePolicy,
}

/// A pipeline's defaults: first retry, cap, attempts before "needs
/// attention", recheck interval after that.
struct PipelineDefaults {
    first_retry_ms: u64,
    max_retry_secs: u64,
    attempts: u32,
    recheck_secs: u64,
}

/// Write-back: a local disk either works within seconds or needs someone
/// (full, failing); a full disk is looked at again every 10 s, so space
/// freed by retention or uploads is used soon.
const WRITE_BACK_DEFAULTS: PipelineDefaults = PipelineDefaults {
    first_retry_ms: 1000,
    max_retry_secs: 2,
    attempts: 3,
    recheck_secs: 10,
};
/// Uploads and replication: 1 s doubling to 60 s, about 4 minutes of
/// attempts before a shard needs attention, then one try a minute so that a
/// bucket or peer that comes back heals it.
const REMOTE_DEFAULTS: PipelineDefaults = PipelineDefaults {
    first_retry_ms: 1000,
    max_retry_secs: 60,
    attempts: 10,
    recheck_secs: 60,
};
/// Longest wait a pipeline setting may ask for.
const MAX_PIPELINE_WAIT_SECS: u64 = 86_400;
/// Most attempts before a shard needs attention.
const MAX_PIPELINE_ATTEMPTS: u32 = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenants {
    /// Namespace → tenant, for namespaces that share another's checkpoints.
    #[serde(default)]
    namespaces: BTreeMap<String, String>,
    /// Memory-tier bytes each tenant may hold, unless `memory_quotas` says.
    memory_quota_bytes: Option<u64>,
    /// Tenant → memory-tier bytes it may hold.
    #[serde(default)]
    memory_quotas: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeers {
    listen: Option<SocketAddr>,
    replicas: Option<usize>,
    concurrency: Option<usize>,
    request_timeout_secs: Option<u64>,
    replica_dir: Option<PathBuf>,
    replica_capacity_bytes: Option<u64>,
    replica_keep_last: Option<usize>,
    check_interval_secs: Option<u64>,
    holder_grace_secs: Option<u64>,
    checks_per_sec: Option<u32>,
    scrub_bytes_per_sec: Option<u64>,
    insecure: Option<bool>,
    #[serde(default)]
    tls: RawTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    enabled: Option<bool>,
    volumes_dir: Option<PathBuf>,
    commit_marker: Option<String>,
    rescan_secs: Option<u64>,
}

/// Ingest of step directories that frameworks write into the CSI plugin's
/// volumes (see `node::ingest`).
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Whether ingest runs. It idles until `volumes_dir` exists (the CSI
    /// plugin creates it), so the default is on: a node without the plugin
    /// pays one `stat` per rescan.
    pub enabled: bool,
    /// The CSI plugin's `--volumes-dir`; must be on the memory tier's
    /// filesystem (files are taken by hard link).
    pub volumes_dir: PathBuf,
    /// When a step directory counts as finished, for volumes that do not
    /// set their own `commitMarker`.
    pub commit_policy: CommitPolicy,
    /// Interval of the rescan that catches what inotify could not report
    /// (a daemon restart, a full event queue).
    pub rescan: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjectStore {
    url: Option<String>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    upload_after: Option<UploadAfter>,
    concurrency: Option<usize>,
    keep_last: Option<usize>,
    keep_every: Option<u64>,
    compression: Option<bool>,
    compression_level: Option<i32>,
    min_compression_ratio: Option<f64>,
    request_timeout_secs: Option<u64>,
    attempts: Option<u32>,
    multipart_threshold_bytes: Option<usize>,
    part_size_bytes: Option<usize>,
    gc_grace_secs: Option<u64>,
    gc_interval_secs: Option<u64>,
}

/// When a shard is queued for upload to the object store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadAfter {
    /// Once the disk tier holds it: the upload reads from local disk and
    /// never competes with the next save for the memory tier.
    #[default]
    Disk,
    /// Right after commit, in parallel with the write-back to disk: the
    /// bucket gets the step sooner, at the cost of reading it from memory.
    Commit,
}

/// The object-store tier's configuration, when one is configured.
#[derive(Debug, Clone)]
pub struct ObjectStoreConfig {
    /// The bucket URL.
    pub url: String,
    /// Backend options (`endpoint`, `allow_http`, credentials, SSE-KMS).
    pub options: BTreeMap<String, String>,
    /// When shards are queued for upload.
    pub upload_after: UploadAfter,
    /// Chunks uploaded at once per shard.
    pub concurrency: usize,
    /// Bucket retention per job.
    pub retention: RetentionPolicy,
    /// How the tier talks to the bucket (compression, timeouts, multipart,
    /// GC grace); `index_dir` is filled in under the disk tier.
    pub settings: ObjectTierSettings,
    /// How often the daemon collects the bucket's garbage (`None`: only on
    /// `cairn gc`).
    pub gc_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    dir: Option<PathBuf>,
    capacity_bytes: Option<u64>,
    pool_bytes: Option<u64>,
    keep_last: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    dir: Option<PathBuf>,
    capacity_bytes: Option<u64>,
    keep_last: Option<usize>,
    writeback_concurrency: Option<usize>,
    reverify_after_secs: Option<u64>,
    scrub_bytes_per_sec: Option<u64>,
}

/// What is wrong with a configuration. cairnd refuses to start with it
/// (exit 2), naming the setting; nothing here is a request error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting's value breaks a rule; the message names the setting.
    #[error("{0}")]
    Invalid(String),
    /// A name in the configuration (tenant, node, marker) breaks the naming
    /// rules.
    #[error(transparent)]
    Name(#[from] cairn_core::CoreError),
    /// The config file could not be read.
    #[error("reading config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not TOML with Cairn's settings.
    #[error("config file {file}: {source}")]
    Parse {
        /// The file, as named.
        file: String,
        /// The parser's error, with the line.
        source: toml::de::Error,
    },
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name, reported in status and logs.
    pub node_name: String,
    /// Tenant for requests on the host socket that name none.
    pub default_tenant: TenantName,
    /// Which tenant each Kubernetes namespace's volumes act for (a
    /// namespace not listed is its own tenant).
    pub tenants: TenantMap,
    /// What each tenant may hold in the memory tier.
    pub memory_quotas: MemoryQuotas,
    /// Client API socket.
    pub socket: PathBuf,
    /// Group given access to the socket, if any.
    pub socket_group: Option<String>,
    /// Optional TCP listener for the client API.
    pub tcp_addr: Option<SocketAddr>,
    /// Metrics listener, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Chunk size for new shards.
    pub chunk_size: ChunkSize,
    /// Save sessions older than this are aborted.
    pub session_timeout: Duration,
    /// Save sessions whose files saw no write for this long are aborted
    /// (their reservation would otherwise block other saves).
    pub session_idle_timeout: Duration,
    /// Memory tier directory.
    pub memory_dir: PathBuf,
    /// Memory tier byte limit.
    pub memory_capacity: u64,
    /// Bytes of evicted files kept for reuse by later saves.
    pub memory_pool_bytes: u64,
    /// Memory tier retention.
    pub memory_retention: RetentionPolicy,
    /// Disk tier directory.
    pub disk_dir: PathBuf,
    /// Disk tier byte limit (stored chunks plus copies in flight).
    pub disk_capacity: u64,
    /// Disk tier retention.
    pub disk_retention: RetentionPolicy,
    /// Chunks copied concurrently by a write-back.
    pub writeback_concurrency: usize,
    /// How long a disk chunk stays trusted after it was written or checked:
    /// older ones are re-hashed before a new shard reuses them.
    pub disk_reverify_after: Duration,
    /// Bytes per second the disk tier's own chunks are re-hashed at in the
    /// background (0: no scrubbing).
    pub disk_scrub_bytes_per_sec: u64,
    /// The object-store tier, if configured.
    pub object_store: Option<ObjectStoreConfig>,
    /// Ingest of CSI volumes.
    pub ingest: IngestConfig,
    /// The peer tier, if configured.
    pub peers: Option<PeerConfig>,
    /// How write-back, uploads and replication retry.
    pub pipelines: PipelinesConfig,
}

impl Config {
    /// Builds the configuration from flags, environment and the file they name.
    pub fn load(args: &Args) -> Result<Self> {
        match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_file_text(args, &path.display().to_string(), &text)
            }
            None => Self::from_parts(args, RawConfig::default()),
        }
    }

    /// Builds the configuration from flags, environment and the text of the
    /// config file called `name` (in errors): [`Config::load`] after the read.
    pub fn from_file_text(args: &Args, name: &str, text: &str) -> Result<Self> {
        let raw = toml::from_str(text).map_err(|source| ConfigError::Parse {
            file: name.to_owned(),
            source,
        })?;
        Self::from_parts(args, raw)
    }

    fn from_parts(args: &Args, raw: RawConfig) -> Result<Self> {
        let node_name = args
            .node_name
            .clone()
            .or(raw.node_name)
            .unwrap_or_else(hostname);
        let tenant = args
            .tenant
            .clone()
            .or(raw.tenant)
            .unwrap_or_else(|| DEFAULT_TENANT.into());
        let default_tenant = TenantName::parse("tenant", tenant)?;
        let metrics_addr = match args
            .metrics_addr
            .clone()
            .or(raw.metrics_addr)
            .unwrap_or_else(|| DEFAULT_METRICS_ADDR.into())
            .as_str()
        {
            "off" | "" => None,
            addr => Some(
                addr.parse()
                    .map_err(|e| ConfigError::Invalid(format!("metrics_addr {addr:?}: {e}")))?,
            ),
        };
        let chunk_size = ChunkSize::new(
            args.chunk_size
                .or(raw.chunk_size)
                .unwrap_or(DEFAULT_CHUNK_SIZE),
        )?;
        let memory_dir = args
            .memory_dir
            .clone()
            .or(raw.memory.dir)
            .unwrap_or_else(|| DEFAULT_MEMORY_DIR.into());
        let disk_dir = args
            .disk_dir
            .clone()
            .or(raw.disk.dir)
            .unwrap_or_else(|| DEFAULT_DISK_DIR.into());
        for (field, dir) in [("memory.dir", &memory_dir), ("disk.dir", &disk_dir)] {
            if !dir.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{field} {} must be an absolute path",
                    dir.display()
                )));
            }
        }
        if memory_dir.starts_with(&disk_dir) || disk_dir.starts_with(&memory_dir) {
            return Err(ConfigError::Invalid(
                "memory.dir and disk.dir must not contain one another".into(),
            ));
        }
        let memory_capacity = match args.memory_capacity.or(raw.memory.capacity_bytes) {
            Some(0) => {
                return Err(ConfigError::Invalid(
                    "memory.capacity_bytes must be above 0".into(),
                ));
            }
            Some(bytes) => bytes,
            None => default_capacity(&memory_dir, DEFAULT_MEMORY_FRACTION),
        };
        let disk_capacity = match args.disk_capacity.or(raw.disk.capacity_bytes) {
            Some(0) => {
                return Err(ConfigError::Invalid(
                    "disk.capacity_bytes must be above 0".into(),
                ));
            }
            Some(bytes) => bytes,
            None => default_capacity(&disk_dir, DEFAULT_DISK_FRACTION),
        };
        let writeback_concurrency = raw
            .disk
            .writeback_concurrency
            .unwrap_or(DEFAULT_WRITEBACK_CONCURRENCY);
        if writeback_concurrency == 0 {
            return Err(ConfigError::Invalid(
                "disk.writeback_concurrency must be above 0".into(),
            ));
        }
        let memory_keep = args
            .memory_keep_last
            .or(raw.memory.keep_last)
            .unwrap_or(DEFAULT_MEMORY_KEEP_LAST);
        let disk_keep = args
            .disk_keep_last
            .or(raw.disk.keep_last)
            .unwrap_or(DEFAULT_DISK_KEEP_LAST);
        if memory_keep == 0 || disk_keep == 0 {
            return Err(ConfigError::Invalid(
                "keep_last must be at least 1 in every tier".into(),
            ));
        }
        let object_store =
            object_store_config(args.object_store_url.clone(), raw.object_store, &disk_dir)?;
        let ingest = ingest_config(raw.ingest, &memory_dir)?;
        let peers = peer_config(args, raw.peers, raw.membership, &node_name, &disk_dir)?;
        let pipelines = PipelinesConfig {
            write_back: pipeline_policy(
                "write_back",
                raw.pipelines.write_back,
                WRITE_BACK_DEFAULTS,
            )?,
            upload: pipeline_policy("upload", raw.pipelines.upload, REMOTE_DEFAULTS)?,
            replication: pipeline_policy(
                "replication",
                raw.pipelines.replication,
                REMOTE_DEFAULTS,
            )?,
        };
        let memory_quotas = memory_quotas(&raw.tenants)?;
        let tenants = tenant_map(raw.tenants)?;
        let tcp_addr = args.tcp_addr.or(raw.tcp_addr);
        if let Some(addr) = tcp_addr
            && !addr.ip().is_loopback()
        {
            return Err(ConfigError::Invalid(format!(
                "tcp_addr {addr}: the TCP listener has no authentication, so it binds to a \
                 loopback address only (127.0.0.1 or ::1); pods reach cairnd through their \
                 volume's socket, other nodes through the peer port (mutual TLS)"
            )));
        }
        Ok(Self {
            node_name,
            default_tenant,
            tenants,
            memory_quotas,
            socket: args
                .socket
                .clone()
                .or(raw.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            socket_group: args.socket_group.clone().or(raw.socket_group),
            tcp_addr,
            metrics_addr,
            chunk_size,
            session_timeout: Duration::from_secs(
                raw.session_timeout_secs
                    .unwrap_or(DEFAULT_SESSION_TIMEOUT_SECS),
            ),
            session_idle_timeout: Duration::from_secs(
                raw.session_idle_timeout_secs
                    .unwrap_or(DEFAULT_SESSION_IDLE_TIMEOUT_SECS),
            ),
            memory_dir,
            memory_capacity,
            memory_pool_bytes: raw
                .memory
                .pool_bytes
                .unwrap_or(memory_capacity / DEFAULT_POOL_FRACTION)
                .min(memory_capacity),
            memory_retention: RetentionPolicy::keep_last(memory_keep),
            disk_dir,
            disk_capacity,
            disk_retention: RetentionPolicy::keep_last(disk_keep),
            writeback_concurrency,
            disk_reverify_after: Duration::from_secs(
                raw.disk
                    .reverify_after_secs
                    .unwrap_or(DEFAULT_DISK_REVERIFY_AFTER_SECS),
            ),
            disk_scrub_bytes_per_sec: args
                .disk_scrub_bytes_per_sec
                .or(raw.disk.scrub_bytes_per_sec)
                .unwrap_or(DEFAULT_SCRUB_BYTES_PER_SEC),
            object_store,
            ingest,
            peers,
            pipelines,
        })
    }
}

/// Validates one `[pipelines.*]` section.
fn pipeline_policy(
    name: &str,
    raw: RawPipeline,
    defaults: PipelineDefaults,
) -> Result<PipelinePolicy> {
    let first_ms = raw.first_retry_ms.unwrap_or(defaults.first_retry_ms);
    let max_secs = raw.max_retry_secs.unwrap_or(defaults.max_retry_secs);
    let attempts = raw.attempts.unwrap_or(defaults.attempts);
    let recheck_secs = raw.recheck_secs.unwrap_or(defaults.recheck_secs);
    let field = |f: &str| format!("pipelines.{name}.{f}");
    if first_ms == 0 || first_ms > MAX_PIPELINE_WAIT_SECS.saturating_mul(1000) {
        return Err(ConfigError::Invalid(format!(
            "{} must be between 1 and {} ms",
            field("first_retry_ms"),
            MAX_PIPELINE_WAIT_SECS.saturating_mul(1000)
        )));
    }
    if max_secs.saturating_mul(1000) < first_ms || max_secs > MAX_PIPELINE_WAIT_SECS {
        return Err(ConfigError::Invalid(format!(
            "{} must be at least first_retry_ms ({first_ms} ms) and at most {MAX_PIPELINE_WAIT_SECS} s",
            field("max_retry_secs")
        )));
    }
    if !(1..=MAX_PIPELINE_ATTEMPTS).contains(&attempts) {
        return Err(ConfigError::Invalid(format!(
            "{} must be between 1 and {MAX_PIPELINE_ATTEMPTS}",
            field("attempts")
        )));
    }
    if recheck_secs > MAX_PIPELINE_WAIT_SECS {
        return Err(ConfigError::Invalid(format!(
            "{} must be at most {MAX_PIPELINE_WAIT_SECS} s (0: only after a restart)",
            field("recheck_secs")
        )));
    }
    Ok(PipelinePolicy {
        retry: RetryPolicy::new(
            Duration::from_millis(first_ms),
            Duration::from_secs(max_secs),
        )
        .tries(attempts),
        recheck: (recheck_secs > 0).then(|| Duration::from_secs(recheck_secs)),
    })
}

/// Validates the `[peers]` and `[membership]` sections; `None` without a
/// membership (a single node).
fn peer_config(
    args: &Args,
    raw: RawPeers,
    membership: Option<MembershipConfig>,
    node_name: &str,
    disk_dir: &Path,
) -> Result<Option<PeerConfig>> {
    let Some(membership) = membership else {
        return Ok(None);
    };
    let invalid = |message: String| Err(ConfigError::Invalid(message));
    let node_id = NodeId::parse("node_name", node_name.to_owned()).map_err(|e| {
        ConfigError::Invalid(format!(
            "{e} (the peer tier names this node by node_name; set it to the Kubernetes node name)"
        ))
    })?;
    let membership = membership
        .validate()
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let listen = args
        .peer_listen
        .or(raw.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PEER_PORT)));
    if listen.port() == 0 {
        return invalid("peers.listen must name a port: other nodes dial it".into());
    }
    let replicas = args
        .peer_replicas
        .or(raw.replicas)
        .unwrap_or(DEFAULT_PEER_REPLICAS);
    if !(1..=MAX_PEER_REPLICAS).contains(&replicas) {
        return invalid(format!(
            "peers.replicas must be 1 to {MAX_PEER_REPLICAS}, not {replicas}"
        ));
    }
    let concurrency = raw.concurrency.unwrap_or(DEFAULT_PEER_CONCURRENCY);
    let timeout = raw
        .request_timeout_secs
        .unwrap_or(DEFAULT_PEER_REQUEST_TIMEOUT_SECS);
    let keep_last = raw.replica_keep_last.unwrap_or(DEFAULT_REPLICA_KEEP_LAST);
    let check_interval = raw
        .check_interval_secs
        .unwrap_or(DEFAULT_HOLDER_CHECK_INTERVAL_SECS);
    let holder_grace = raw.holder_grace_secs.unwrap_or(DEFAULT_HOLDER_GRACE_SECS);
    let checks_per_sec = raw.checks_per_sec.unwrap_or(DEFAULT_HOLDER_CHECKS_PER_SEC);
    for (field, value) in [
        ("concurrency", concurrency as u64),
        ("request_timeout_secs", timeout),
        ("replica_keep_last", keep_last as u64),
        ("check_interval_secs", check_interval),
        ("checks_per_sec", u64::from(checks_per_sec)),
    ] {
        if value == 0 {
            return invalid(format!("peers.{field} must be above 0"));
        }
    }
    for (field, value) in [
        ("check_interval_secs", check_interval),
        ("holder_grace_secs", holder_grace),
        ("request_timeout_secs", timeout),
    ] {
        if value > MAX_PEER_INTERVAL_SECS {
            return invalid(format!(
                "peers.{field} must be at most {MAX_PEER_INTERVAL_SECS} (a week), not {value}"
            ));
        }
    }
    let replica_dir = raw
        .replica_dir
        .unwrap_or_else(|| disk_dir.join(REPLICA_SUBDIR));
    if !replica_dir.is_absolute() {
        return invalid(format!(
            "peers.replica_dir {} must be an absolute path",
            replica_dir.display()
        ));
    }
    let insecure = args.insecure_peers || raw.insecure.unwrap_or(false);
    let tls = match (
        args.peer_tls_cert.clone().or(raw.tls.cert),
        args.peer_tls_key.clone().or(raw.tls.key),
        args.peer_tls_ca.clone().or(raw.tls.ca),
    ) {
        (Some(cert), Some(key), Some(ca)) if !insecure => Some(TlsFiles { cert, key, ca }),
        (None, None, None) if insecure => None,
        (None, None, None) => {
            return invalid(
                "the peer tier needs peers.tls.cert, peers.tls.key and peers.tls.ca \
                 (or --insecure-peers to run peer traffic without TLS)"
                    .into(),
            );
        }
        _ if insecure => {
            return invalid(
                "--insecure-peers and peers.tls files exclude each other; choose one".into(),
            );
        }
        _ => {
            return invalid("peers.tls needs all three of cert, key and ca".into());
        }
    };
    Ok(Some(PeerConfig {
        node_id,
        listen,
        replicas,
        concurrency,
        request_timeout: Duration::from_secs(timeout),
        replica_dir,
        replica_capacity: raw.replica_capacity_bytes.unwrap_or(0),
        replica_keep_last: keep_last,
        check_interval: Duration::from_secs(check_interval),
        holder_grace: Duration::from_secs(holder_grace),
        checks_per_sec,
        scrub_bytes_per_sec: raw
            .scrub_bytes_per_sec
            .unwrap_or(DEFAULT_SCRUB_BYTES_PER_SEC),
        tls,
        membership,
    }))
}

/// The `[tenants]` memory quotas, every name validated.
fn memory_quotas(raw: &RawTenants) -> Result<MemoryQuotas> {
    let by_tenant = raw
        .memory_quotas
        .iter()
        .map(|(tenant, bytes)| {
            Ok((
                TenantName::parse("tenants.memory_quotas key", tenant.clone())?,
                *bytes,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MemoryQuotas::new(raw.memory_quota_bytes, by_tenant))
}

/// The `[tenants] namespaces` table, every name validated.
fn tenant_map(raw: RawTenants) -> Result<TenantMap> {
    let entries = raw
        .namespaces
        .into_iter()
        .map(|(namespace, tenant)| {
            let namespace = TenantName::parse("tenants.namespaces key", namespace)?;
            let tenant = TenantName::parse(&format!("tenants.namespaces.{namespace}"), tenant)?;
            Ok((namespace, tenant))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TenantMap::new(entries))
}

/// Validates the `[ingest]` section.
fn ingest_config(raw: RawIngest, memory_dir: &Path) -> Result<IngestConfig> {
    let volumes_dir = raw
        .volumes_dir
        .unwrap_or_else(|| memory_dir.join(DEFAULT_VOLUMES_SUBDIR));
    if !volumes_dir.is_absolute() {
        return Err(ConfigError::Invalid(format!(
            "ingest.volumes_dir {} must be an absolute path",
            volumes_dir.display()
        )));
    }
    let commit_policy = match raw.commit_marker {
        Some(marker) => CommitPolicy::parse("ingest.commit_marker", &marker)?,
        None => CommitPolicy::default(),
    };
    let rescan_secs = raw.rescan_secs.unwrap_or(DEFAULT_INGEST_RESCAN_SECS);
    if rescan_secs == 0 {
        return Err(ConfigError::Invalid(
            "ingest.rescan_secs must be above 0".into(),
        ));
    }
    Ok(IngestConfig {
        enabled: raw.enabled.unwrap_or(true),
        volumes_dir,
        commit_policy,
        rescan: Duration::from_secs(rescan_secs),
    })
}

/// Longest `object_store.request_timeout_secs` accepted: a day.
const MAX_REQUEST_TIMEOUT_SECS: u64 = 86_400;
/// Most `object_store.attempts` accepted.
const MAX_OBJECT_ATTEMPTS: u64 = 100;

/// Validates the `[object_store]` section; `None` when no URL is set.
fn object_store_config(
    url_flag: Option<String>,
    raw: RawObjectStore,
    disk_dir: &Path,
) -> Result<Option<ObjectStoreConfig>> {
    let Some(url) = url_flag.or(raw.url).filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let positive = |field: &str, value: u64| {
        if value == 0 {
            Err(ConfigError::Invalid(format!(
                "object_store.{field} must be above 0"
            )))
        } else {
            Ok(value)
        }
    };
    // Bounded: an upload's deadline is the request timeout times its
    // requests, and absurd values would only hide a typo.
    let at_most = |field: &str, value: u64, max: u64| {
        if value > max {
            Err(ConfigError::Invalid(format!(
                "object_store.{field} must be at most {max}, not {value}"
            )))
        } else {
            Ok(value)
        }
    };
    let defaults = ObjectTierSettings::default();
    let min_ratio = raw
        .min_compression_ratio
        .unwrap_or(defaults.compression.min_ratio);
    if !(min_ratio.is_finite() && min_ratio >= 1.0) {
        return Err(ConfigError::Invalid(
            "object_store.min_compression_ratio must be at least 1.0".into(),
        ));
    }
    let level = raw.compression_level.unwrap_or(defaults.compression.level);
    if !(1..=19).contains(&level) {
        return Err(ConfigError::Invalid(
            "object_store.compression_level must be between 1 and 19".into(),
        ));
    }
    let part_size = raw.part_size_bytes.unwrap_or(defaults.part_size);
    if part_size < MIN_PART_SIZE {
        return Err(ConfigError::Invalid(format!(
            "object_store.part_size_bytes must be at least {MIN_PART_SIZE} (the S3 minimum)"
        )));
    }
    let settings = ObjectTierSettings {
        compression: CompressionPolicy {
            enabled: raw.compression.unwrap_or(true),
            level,
            min_ratio,
        },
        request_timeout: Duration::from_secs(at_most(
            "request_timeout_secs",
            positive(
                "request_timeout_secs",
                raw.request_timeout_secs
                    .unwrap_or(defaults.request_timeout.as_secs()),
            )?,
            MAX_REQUEST_TIMEOUT_SECS,
        )?),
        attempts: at_most(
            "attempts",
            positive(
                "attempts",
                u64::from(raw.attempts.unwrap_or(defaults.attempts)),
            )?,
            MAX_OBJECT_ATTEMPTS,
        )? as u32,
        multipart_threshold: raw
            .multipart_threshold_bytes
            .unwrap_or(defaults.multipart_threshold)
            .max(part_size),
        part_size,
        gc_grace: Duration::from_secs(positive(
            "gc_grace_secs",
            raw.gc_grace_secs.unwrap_or(defaults.gc_grace.as_secs()),
        )?),
        index_dir: Some(disk_dir.join(OBJECT_INDEX_DIR)),
    };
    Ok(Some(ObjectStoreConfig {
        url,
        options: raw.options,
        upload_after: raw.upload_after.unwrap_or_default(),
        concurrency: positive(
            "concurrency",
            raw.concurrency.unwrap_or(DEFAULT_UPLOAD_CONCURRENCY) as u64,
        )? as usize,
        retention: RetentionPolicy {
            keep_last: positive(
                "keep_last",
                raw.keep_last.unwrap_or(DEFAULT_OBJECT_KEEP_LAST) as u64,
            )? as usize,
            keep_every: raw.keep_every.filter(|k| *k > 0),
        },
        settings,
        gc_interval: match raw.gc_interval_secs.unwrap_or(DEFAULT_GC_INTERVAL_SECS) {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        },
    }))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Half of the filesystem that will hold the memory tier (its nearest
/// existing ancestor), so that a default install cannot fill the node's RAM.
/// `fraction` of the size of the filesystem that holds (or will hold) `dir`.
fn default_capacity(dir: &Path, fraction: f64) -> u64 {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let total = crate::fsutil::filesystem_size(existing).unwrap_or(0);
    (total as f64 * fraction) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            memory_dir: Some("/dev/shm/x".into()),
            disk_dir: Some("/tmp/y".into()),
            ..Args::default()
        }
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let raw: RawConfig = toml::from_str(
            "tenant = \"team-a\"\nchunk_size = 1048576\n[memory]\nkeep_last = 5\ncapacity_bytes = 1000\n",
        )
        .expect("parses");
        let mut a = args();
        a.memory_keep_last = Some(7);
        let c = Config::from_parts(&a, raw).expect("valid");
        assert_eq!(c.default_tenant.as_str(), "team-a");
        assert_eq!(c.chunk_size.get(), 1 << 20);
        assert_eq!(c.memory_retention.keep_last, 7);
        assert_eq!(c.disk_retention.keep_last, DEFAULT_DISK_KEEP_LAST);
        assert_eq!(c.memory_capacity, 1000);
    }

    #[test]
    fn namespaces_map_to_tenants_and_tcp_stays_on_loopback() {
        let raw: RawConfig =
            toml::from_str("[tenants]\nnamespaces = { ml-dev = \"ml\", ml-prod = \"ml\" }\n")
                .expect("parses");
        let c = Config::from_parts(&args(), raw).expect("valid");
        let ns = |n: &str| TenantName::parse("t", n.into()).expect("name");
        assert_eq!(c.tenants.tenant_of(&ns("ml-dev")).as_str(), "ml");
        assert_eq!(c.tenants.tenant_of(&ns("other")).as_str(), "other");
        let raw: RawConfig =
            toml::from_str("[tenants]\nnamespaces = { ml-dev = \"ML\" }\n").expect("parses");
        let err = Config::from_parts(&args(), raw).expect_err("bad tenant");
        assert!(
            err.to_string().contains("tenants.namespaces.ml-dev"),
            "{err}"
        );

        let mut a = args();
        a.tcp_addr = Some("127.0.0.1:7000".parse().expect("addr"));
        assert!(Config::from_parts(&a, RawConfig::default()).is_ok());
        for open in ["0.0.0.0:7000", "10.0.0.5:7000", "[::]:7000"] {
            a.tcp_addr = Some(open.parse().expect("addr"));
            let err = Config::from_parts(&a, RawConfig::default()).expect_err(open);
            assert!(err.to_string().contains("loopback"), "{err}");
        }
    }

    #[test]
    fn bad_values_name_the_option() {
        let err = toml::from_str::<RawConfig>("bogus = 1").expect_err("unknown key");
        assert!(err.to_string().contains("bogus"), "{err}");
        let mut a = args();
        a.disk_dir = Some("relative".into());
        let err = Config::from_parts(&a, RawConfig::default()).expect_err("relative dir");
        assert!(err.to_string().contains("disk.dir"), "{err}");
        let mut a = args();
        a.chunk_size = Some(1000);
        let err = Config::from_parts(&a, RawConfig::default()).expect_err("bad chunk size");
        assert!(err.to_string().contains("chunk_size"), "{err}");
        let mut a = args();
        a.tenant = Some("Bad_Tenant".into());
        assert!(Config::from_parts(&a, RawConfig::default()).is_err());
    }

    #[test]
    fn pipeline_sections_have_defaults_and_are_validated() {
        let c = Config::from_parts(&args(), RawConfig::default()).expect("valid");
        assert_eq!(c.pipelines.write_back.retry.max_tries, Some(3));
        assert_eq!(
            c.pipelines.write_back.recheck,
            Some(Duration::from_secs(10))
        );
        assert_eq!(c.pipelines.upload.retry.max_delay, Duration::from_secs(60));
        assert_eq!(c.pipelines.replication.retry.max_tries, Some(10));
        let raw: RawConfig = toml::from_str(
            "[pipelines.upload]\nfirst_retry_ms = 200\nmax_retry_secs = 5\nattempts = 4\nrecheck_secs = 0\n",
        )
        .expect("parses");
        let c = Config::from_parts(&args(), raw).expect("valid");
        assert_eq!(
            c.pipelines.upload.retry.first_delay,
            Duration::from_millis(200)
        );
        assert_eq!(c.pipelines.upload.retry.max_delay, Duration::from_secs(5));
        assert_eq!(c.pipelines.upload.retry.max_tries, Some(4));
        assert_eq!(c.pipelines.upload.recheck, None, "0: only after a restart");
        for (section, field) in [
            (
                "[pipelines.write_back]\nattempts = 0",
                "pipelines.write_back.attempts",
            ),
            (
                "[pipelines.upload]\nfirst_retry_ms = 0",
                "pipelines.upload.first_retry_ms",
            ),
            (
                "[pipelines.replication]\nfirst_retry_ms = 5000\nmax_retry_secs = 1",
                "pipelines.replication.max_retry_secs",
            ),
            (
                "[pipelines.upload]\nrecheck_secs = 86401",
                "pipelines.upload.recheck_secs",
            ),
        ] {
            let raw: RawConfig = toml::from_str(section).expect("parses");
            let err = Config::from_parts(&args(), raw).expect_err(section);
            assert!(matches!(err, ConfigError::Invalid(_)), "{err:?}");
            assert!(err.to_string().contains(field), "{err}");
        }
        let err = Config::from_file_text(&args(), "cairn.toml", "[pipelines.upload]\nretries = 3")
            .expect_err("unknown key");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        assert!(
            err.to_string().contains("cairn.toml") && err.to_string().contains("retries"),
            "{err}"
        );
    }

    #[test]
    fn ingest_section_has_defaults_and_is_validated() {
        let c = Config::from_parts(&args(), RawConfig::default()).expect("valid");
        assert!(c.ingest.enabled);
        assert_eq!(c.ingest.volumes_dir, PathBuf::from("/dev/shm/x/volumes"));
        assert_eq!(c.ingest.commit_policy, CommitPolicy::default());
        assert_eq!(
            c.ingest.rescan,
            Duration::from_secs(DEFAULT_INGEST_RESCAN_SECS)
        );
        let raw: RawConfig = toml::from_str(
            "[ingest]\nenabled = false\ncommit_marker = \".metadata\"\nrescan_secs = 2\n",
        )
        .expect("parses");
        let c = Config::from_parts(&args(), raw).expect("valid");
        assert!(!c.ingest.enabled);
        assert_eq!(c.ingest.commit_policy.marker(), Some(".metadata"));
        assert_eq!(c.ingest.rescan, Duration::from_secs(2));
        let raw: RawConfig = toml::from_str("[ingest]\ncommit_marker = \"\"\n").expect("parses");
        let c = Config::from_parts(&args(), raw).expect("valid");
        assert_eq!(c.ingest.commit_policy, CommitPolicy::Rename);
        for bad in [
            "rescan_secs = 0",
            "commit_marker = \"a/b\"",
            "volumes_dir = \"relative\"",
        ] {
            let raw: RawConfig = toml::from_str(&format!("[ingest]\n{bad}\n")).expect("parses");
            let err = Config::from_parts(&args(), raw).expect_err(bad);
            let field = bad.split(' ').next().expect("field");
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn object_store_section_is_validated_and_optional() {
        let c = Config::from_parts(&args(), RawConfig::default()).expect("valid");
        assert!(c.object_store.is_none());
        let raw: RawConfig = toml::from_str(
            "[object_store]\nurl = \"s3://b/p\"\nupload_after = \"commit\"\nkeep_every = 100\n[object_store.options]\nendpoint = \"http://127.0.0.1:1\"\n",
        )
        .expect("parses");
        let c = Config::from_parts(&args(), raw).expect("valid");
        let o = c.object_store.expect("configured");
        assert_eq!(o.upload_after, UploadAfter::Commit);
        assert_eq!(o.retention.keep_every, Some(100));
        assert_eq!(o.retention.keep_last, DEFAULT_OBJECT_KEEP_LAST);
        assert_eq!(o.options["endpoint"], "http://127.0.0.1:1");
        assert_eq!(
            o.settings.index_dir,
            Some(PathBuf::from("/tmp/y").join(OBJECT_INDEX_DIR))
        );
        for bad in [
            "part_size_bytes = 1000",
            "min_compression_ratio = 0.5",
            "concurrency = 0",
            "upload_after = \"later\"",
            // Regression: these made the deadline of a multipart upload
            // overflow (a panic at the first large object).
            "request_timeout_secs = 9223372036854775807",
            "attempts = 4294967295",
        ] {
            let text = format!("[object_store]\nurl = \"file:///x\"\n{bad}\n");
            let result = toml::from_str::<RawConfig>(&text)
                .map_err(|e| e.to_string())
                .and_then(|raw| Config::from_parts(&args(), raw).map_err(|e| e.to_string()));
            let err = result.expect_err(bad);
            let field = bad.split(' ').next().expect("field");
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    fn peer_config(extra: &str, args: Args) -> std::result::Result<Config, String> {
        let text = format!(
            "node_name = \"node-a\"\n{extra}\n[membership]\nsource = \"static\"\n\
             [[membership.peers]]\nid = \"node-a\"\naddress = \"10.0.0.1\"\n"
        );
        let raw: RawConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        Config::from_parts(&args, raw).map_err(|e| e.to_string())
    }

    #[test]
    fn the_peer_tier_needs_tls_files_or_an_explicit_insecure_flag() {
        let err = peer_config("", args()).expect_err("no TLS, no flag");
        assert!(err.contains("--insecure-peers"), "{err}");
        let err = peer_config("[peers.tls]\ncert = \"/c\"\nkey = \"/k\"\n", args())
            .expect_err("two of three files");
        assert!(err.contains("all three"), "{err}");

        let insecure = Args {
            insecure_peers: true,
            ..args()
        };
        let c = peer_config("", insecure).expect("insecure on purpose");
        let p = c.peers.expect("peer tier");
        assert!(p.tls.is_none());
        assert_eq!(p.replicas, DEFAULT_PEER_REPLICAS);
        assert_eq!(p.listen.port(), DEFAULT_PEER_PORT);
        assert_eq!(p.replica_dir, PathBuf::from("/tmp/y").join(REPLICA_SUBDIR));

        let c = peer_config(
            "[peers]\nreplicas = 2\n[peers.tls]\ncert = \"/c\"\nkey = \"/k\"\nca = \"/ca\"\n",
            args(),
        )
        .expect("TLS files");
        let p = c.peers.expect("peer tier");
        assert_eq!(p.replicas, 2);
        assert_eq!(p.tls.expect("tls").ca, PathBuf::from("/ca"));
        assert!(
            Config::from_parts(&args(), RawConfig::default())
                .expect("valid")
                .peers
                .is_none()
        );
    }

    #[test]
    fn bad_peer_values_name_the_field() {
        let insecure = || Args {
            insecure_peers: true,
            ..args()
        };
        for (bad, field) in [
            ("[peers]\nreplicas = 0", "peers.replicas"),
            ("[peers]\nreplicas = 99", "peers.replicas"),
            ("[peers]\nlisten = \"0.0.0.0:0\"", "peers.listen"),
            ("[peers]\nconcurrency = 0", "peers.concurrency"),
            ("[peers]\nreplica_dir = \"relative\"", "peers.replica_dir"),
        ] {
            let err = peer_config(bad, insecure()).expect_err(bad);
            assert!(err.contains(field), "{bad}: {err}");
        }
        let err = peer_config(
            "",
            Args {
                node_name: Some("Not_A_Node".into()),
                ..insecure()
            },
        )
        .expect_err("node name");
        assert!(err.contains("node_name"), "{err}");
    }
}
