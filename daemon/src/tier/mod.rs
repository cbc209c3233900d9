//! The storage tiers behind two traits.
//!
//! [`ShardSource`] is what restore, verify and replication read from: any tier
//! that can say which shards it holds and hand back a chunk, verified against
//! its hash. [`ChunkSink`] is what replication writes to: a content-addressed
//! store that says which chunks it lacks, takes chunks, and then takes the
//! manifest last. The memory tier (T0) is a source only, since it holds
//! shards as whole files that clients write directly; the disk tier (T1) is
//! both. The peer tier (T2) and object-store tier (T3) plug in as further
//! sources and sinks without changing the callers in [`crate::tier::transfer`].

pub mod disk;
pub mod memory;
pub mod object;
pub mod peer;
pub mod transfer;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::{ChunkId, ChunkRef, JobName, Manifest, ShardKey, TenantName};

use crate::error::Result;

/// Which tier something lives in, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    /// T0: tmpfs.
    Memory,
    /// T1: local disk.
    Disk,
    /// T2: replicas on peer nodes.
    Peers,
    /// T3: an object store (S3, GCS, Azure Blob or a local directory).
    ObjectStore,
}

impl TierKind {
    /// The lower-case name used in metrics labels, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TierKind::Memory => "memory",
            TierKind::Disk => "disk",
            TierKind::Peers => "peers",
            TierKind::ObjectStore => "object-store",
        }
    }
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one chunk of a shard sits: enough for any tier to find it, whether
/// it stores whole files (memory) or chunks by id (disk, peers, buckets).
#[derive(Clone, Debug)]
pub struct ChunkLocation {
    /// The shard's manifest.
    pub manifest: Arc<Manifest>,
    /// Index of the file in the manifest.
    pub file_index: usize,
    /// Byte offset of the chunk in that file.
    pub offset: u64,
    /// The chunk.
    pub chunk: ChunkRef,
}

impl ChunkLocation {
    /// Every chunk of a manifest, in file order.
    pub fn all(manifest: &Arc<Manifest>) -> Vec<ChunkLocation> {
        manifest
            .files
            .iter()
            .enumerate()
            .flat_map(|(file_index, file)| {
                file.chunks_with_offsets()
                    .map(move |(offset, chunk)| ChunkLocation {
                        manifest: Arc::clone(manifest),
                        file_index,
                        offset,
                        chunk: *chunk,
                    })
            })
            .collect()
    }

    /// The shard the chunk belongs to.
    pub fn shard(&self) -> &ShardKey {
        &self.manifest.shard
    }

    /// The file's name, for messages.
    pub fn file_name(&self) -> &str {
        self.manifest.files[self.file_index].name.as_str()
    }
}

/// The result of reading one chunk from a tier.
#[derive(Debug)]
pub enum ChunkRead {
    /// The bytes, whose BLAKE3 matched the chunk id.
    Verified(Bytes),
    /// The tier does not have the chunk.
    Missing,
    /// The tier has bytes under this id that do not match it.
    Corrupt,
}

impl ChunkRead {
    /// What a tier read of `bytes` (`None`: the tier lacks them) is for
    /// the chunk `id`: hashes them.
    pub fn check(bytes: Option<Bytes>, id: ChunkId) -> Self {
        match bytes {
            None => Self::Missing,
            Some(bytes) if ChunkId::of(&bytes) != id => Self::Corrupt,
            Some(bytes) => Self::Verified(bytes),
        }
    }
}

/// A tier that shards can be read from.
#[async_trait]
pub trait ShardSource: Send + Sync {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// The shard's manifest, if the shard is complete in this tier.
    async fn manifest(&self, key: &ShardKey) -> Result<Option<Arc<Manifest>>>;

    /// Manifests of the complete shards of a tenant (one job, or all).
    async fn list(&self, tenant: &TenantName, job: Option<&JobName>) -> Result<Vec<Arc<Manifest>>>;

    /// Reads one chunk and checks it against its id.
    async fn read_chunk(&self, location: &ChunkLocation) -> Result<ChunkRead>;

    /// Reads one chunk without checking it, for a copy into a sink that
    /// checks every chunk itself ([`ChunkSink::verifies_chunks`]): one hash
    /// per byte per hop, on the side that stores it. `None` when the tier
    /// has no such chunk, or no cheaper read than [`Self::read_chunk`] found
    /// it good (the caller then reads it checked).
    async fn read_chunk_unchecked(&self, location: &ChunkLocation) -> Result<Option<Bytes>> {
        match self.read_chunk(location).await? {
            ChunkRead::Verified(bytes) => Ok(Some(bytes)),
            ChunkRead::Missing | ChunkRead::Corrupt => Ok(None),
        }
    }
}

/// A content-addressed tier that shards can be copied into.
#[async_trait]
pub trait ChunkSink: Send + Sync {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// Of `ids`, those the tier does not hold for `tenant`.
    async fn missing_chunks(&self, tenant: &TenantName, ids: &[ChunkId]) -> Result<Vec<ChunkId>>;

    /// Whether the tier re-hashes every chunk it is given and refuses one
    /// whose bytes do not match its id with [`crate::error::Error::DataLoss`]
    /// (a peer does: the sender could be wrong or lying). Copies into it read
    /// their chunks unchecked and send a checked copy only after a refusal.
    fn verifies_chunks(&self) -> bool {
        false
    }

    /// Stores a chunk durably; its bytes were verified by the caller, unless
    /// [`Self::verifies_chunks`]. The location names the shard and file it
    /// was read for, so a tier can use the file's metadata (the object store
    /// picks its compression by dtype).
    async fn put_chunk(&self, location: &ChunkLocation, data: Bytes) -> Result<()>;

    /// Stores a manifest durably; every chunk it names must already be stored.
    async fn put_manifest(&self, manifest: &Manifest) -> Result<()>;
}
