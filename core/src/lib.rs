//! Cairn's pure core.
//!
//! Everything here is deterministic logic with no I/O and no async runtime:
//! chunk ids and fixed-size chunking, the stored-chunk codec, the manifest format, validation of every
//! name that arrives from outside, step ordering, retention decisions,
//! replica placement and restore planning.
//! Keeping it pure keeps it fast to compile and lets property tests cover it
//! exhaustively; the daemon wraps it with tiers, RPCs and background work.

// Sizes, counts and offsets arrive from outside (requests, manifests, peers,
// listings, files on disk): they must use checked or saturating arithmetic.
#![warn(clippy::arithmetic_side_effects)]

pub mod bucket;
pub mod chunk;
pub mod codec;
pub mod error;
pub mod ingest;
pub mod manifest;
pub mod membership;
pub mod names;
pub mod placement;
pub mod restore_plan;
pub mod retention;
pub mod tenancy;

pub use chunk::{ChunkId, ChunkSize, DEFAULT_CHUNK_SIZE, chunk_ranges};
pub use error::CoreError;
pub use manifest::{ChunkRef, FileEntry, MANIFEST_VERSION, Manifest};
pub use membership::{
    DepartureGrace, MembershipDiff, MembershipView, NodeInfo, Peer, PeerChange, PodInfo,
    StaticPeer, TopologyLabels,
};
pub use names::{Attempt, FileName, JobName, Rank, ShardKey, Step, TenantName};
pub use placement::{
    MAX_DOMAIN_LABEL_LEN, MAX_NODE_ID_LEN, MAX_WEIGHT, Member, Membership, NodeId,
    PLACEMENT_VERSION, PlacementKey,
};
pub use retention::{
    EvictionCandidate, RetentionPolicy, ShardPresence, StepResidency, choose_pressure_victims,
    latest_complete_step,
};
