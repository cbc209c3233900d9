//! What the peer tier is configured with. `crate::config` reads it from the
//! file, flags and environment and validates it; the tier owns its shape.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cairn_core::NodeId;

use super::tls::TlsFiles;
use crate::membership::MembershipSettings;

/// The peer tier (T2), enabled by a `[membership]` section.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// This node's id in the membership: `node_name`, which must then be a
    /// DNS name (as Kubernetes node names are).
    pub node_id: NodeId,
    /// Where the peer service listens.
    pub listen: SocketAddr,
    /// Replicas of each shard.
    pub replicas: usize,
    /// Chunks in flight per replica copy.
    pub concurrency: usize,
    /// Stall bound of one peer request.
    pub request_timeout: Duration,
    /// Where replicas for other nodes are kept.
    pub replica_dir: PathBuf,
    /// Most bytes of replicas kept for others (0: as the filesystem allows).
    pub replica_capacity: u64,
    /// Steps of each job and rank kept as replicas.
    pub replica_keep_last: usize,
    /// How often every holder of this node's shards is asked whether it
    /// still holds them (see `node::replicate`).
    pub check_interval: Duration,
    /// How long a holder may be unreachable before its copies stop counting.
    pub holder_grace: Duration,
    /// Most holder checks per second.
    pub checks_per_sec: u32,
    /// Bytes per second the replica store re-hashes (0: no scrubbing).
    pub scrub_bytes_per_sec: u64,
    /// Certificate files; `None` runs without TLS (`--insecure-peers`).
    pub tls: Option<TlsFiles>,
    /// Where the members come from.
    pub membership: MembershipSettings,
}
