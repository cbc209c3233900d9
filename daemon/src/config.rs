//! Configuration: a TOML file, environment variables and flags, parsed into
//! one validated [`Config`].
//!
//! Precedence: flag > environment variable > file > default. Every option is
//! documented in `docs/configuration.md`; defaults are the named constants
//! below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_core::{ChunkSize, DEFAULT_CHUNK_SIZE, RetentionPolicy, TenantName};
use clap::Parser;
use serde::Deserialize;

use crate::error::{Error, IoContext, Result};

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
/// Default steps kept per job in the disk tier.
pub const DEFAULT_DISK_KEEP_LAST: usize = 3;
/// Default share of the memory tier's filesystem Cairn may use.
pub const DEFAULT_MEMORY_FRACTION: f64 = 0.5;
/// Default share of the memory tier's capacity kept as recycled files.
pub const DEFAULT_POOL_FRACTION: u64 = 4;
/// Default time after which an idle save session is aborted.
pub const DEFAULT_SESSION_TIMEOUT_SECS: u64 = 600;
/// Default chunks copied at once by a write-back.
pub const DEFAULT_WRITEBACK_CONCURRENCY: usize = 4;

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
    /// Steps per job kept in the disk tier.
    #[arg(long, env = "CAIRN_DISK_KEEP_LAST")]
    pub disk_keep_last: Option<usize>,
    /// Chunk size in bytes.
    #[arg(long, env = "CAIRN_CHUNK_SIZE")]
    pub chunk_size: Option<u64>,
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
    #[serde(default)]
    memory: RawMemory,
    #[serde(default)]
    disk: RawDisk,
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
    keep_last: Option<usize>,
    writeback_concurrency: Option<usize>,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name, reported in status and logs.
    pub node_name: String,
    /// Tenant for requests that name none.
    pub default_tenant: TenantName,
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
    /// Idle save sessions older than this are aborted.
    pub session_timeout: Duration,
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
    /// Disk tier retention.
    pub disk_retention: RetentionPolicy,
    /// Chunks copied concurrently by a write-back.
    pub writeback_concurrency: usize,
}

impl Config {
    /// Builds the configuration from flags, environment and the file they name.
    pub fn load(args: &Args) -> Result<Self> {
        let raw = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .io_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).map_err(|e| {
                    Error::InvalidArgument(format!("config file {}: {e}", path.display()))
                })?
            }
            None => RawConfig::default(),
        };
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
                    .map_err(|e| Error::InvalidArgument(format!("metrics_addr {addr:?}: {e}")))?,
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
                return Err(Error::InvalidArgument(format!(
                    "{field} {} must be an absolute path",
                    dir.display()
                )));
            }
        }
        if memory_dir.starts_with(&disk_dir) || disk_dir.starts_with(&memory_dir) {
            return Err(Error::InvalidArgument(
                "memory.dir and disk.dir must not contain one another".into(),
            ));
        }
        let memory_capacity = match args.memory_capacity.or(raw.memory.capacity_bytes) {
            Some(0) => {
                return Err(Error::InvalidArgument(
                    "memory.capacity_bytes must be above 0".into(),
                ));
            }
            Some(bytes) => bytes,
            None => default_memory_capacity(&memory_dir),
        };
        let writeback_concurrency = raw
            .disk
            .writeback_concurrency
            .unwrap_or(DEFAULT_WRITEBACK_CONCURRENCY);
        if writeback_concurrency == 0 {
            return Err(Error::InvalidArgument(
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
            return Err(Error::InvalidArgument(
                "keep_last must be at least 1 in every tier".into(),
            ));
        }
        Ok(Self {
            node_name,
            default_tenant,
            socket: args
                .socket
                .clone()
                .or(raw.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            socket_group: args.socket_group.clone().or(raw.socket_group),
            tcp_addr: args.tcp_addr.or(raw.tcp_addr),
            metrics_addr,
            chunk_size,
            session_timeout: Duration::from_secs(
                raw.session_timeout_secs
                    .unwrap_or(DEFAULT_SESSION_TIMEOUT_SECS),
            ),
            memory_dir,
            memory_capacity,
            memory_pool_bytes: raw
                .memory
                .pool_bytes
                .unwrap_or(memory_capacity / DEFAULT_POOL_FRACTION)
                .min(memory_capacity),
            memory_retention: RetentionPolicy {
                keep_last: memory_keep,
            },
            disk_dir,
            disk_retention: RetentionPolicy {
                keep_last: disk_keep,
            },
            writeback_concurrency,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Half of the filesystem that will hold the memory tier (its nearest
/// existing ancestor), so that a default install cannot fill the node's RAM.
fn default_memory_capacity(dir: &Path) -> u64 {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let total = crate::fsutil::filesystem_size(existing).unwrap_or(0);
    (total as f64 * DEFAULT_MEMORY_FRACTION) as u64
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
}
