//! The replicas a node keeps for other nodes (its share of T2).
//!
//! A [`DiskTier`] of its own under `peers.replica_dir`, so replicas never mix
//! with the node's own shards: they have their own retention (the newest
//! `keep_last` steps of each job and rank), their own capacity, and listing
//! the node's own checkpoints never shows another node's. Next to it,
//! `owners.json` records whose shard each replica is, with the owner's
//! failure domains: when the owner leaves the membership, the holders work
//! out from it where the replicas belong now (placement is a function of the
//! owner) and restore the replica count.
//!
//! A manifest is stored only after checking, under the read side of
//! `gc_lock`, that every chunk it names is stored; garbage collection takes
//! the write side. So a collection between a sender's "which chunks do you
//! lack" and its manifest can only make the manifest fail (the sender sends
//! the chunks again), never leave a manifest whose chunks are gone.
//!
//! Chunks are written without an fsync each; storing a manifest first syncs
//! the store's filesystem once, so every chunk a manifest names is durable
//! before the manifest is (a batch of unsynced writes and one `syncfs` cost
//! far less than an fsync per chunk).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cairn_core::{ChunkId, JobName, Manifest, Member, NodeId, PlacementKey, ShardKey, TenantName};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::tier::disk::{DiskTier, GcReport, Scrubbed};
use crate::tier::{ChunkSink, ShardSource};

const OWNERS_FILE: &str = "owners.json";

#[derive(Serialize, Deserialize)]
struct OwnerEntry {
    shard: ShardKey,
    owner: Member,
}

/// The replica store.
pub struct ReplicaStore {
    tier: DiskTier,
    root: PathBuf,
    owners: Mutex<BTreeMap<ShardKey, Member>>,
    capacity: u64,
    keep_last: usize,
    gc_lock: RwLock<()>,
    /// Bytes of chunks received but not yet named by a stored manifest (an
    /// estimate: reset by each collection), so the capacity counts a replica
    /// in flight.
    unreferenced: AtomicU64,
}

impl ReplicaStore {
    /// Opens the store at `root` (created if needed), keeping at most
    /// `capacity` bytes (0: as much as the filesystem holds) and the newest
    /// `keep_last` steps of each job and rank.
    pub fn open(root: &Path, capacity: u64, keep_last: usize) -> Result<Self> {
        std::fs::create_dir_all(root).io_context(|| format!("creating {}", root.display()))?;
        let tier = DiskTier::open(root)?;
        let owners_path = root.join(OWNERS_FILE);
        let owners = match std::fs::read(&owners_path) {
            Ok(bytes) => serde_json::from_slice::<Vec<OwnerEntry>>(&bytes)
                .map_err(|e| {
                    Error::DataLoss(format!("{} is not valid: {e}", owners_path.display()))
                })?
                .into_iter()
                .map(|e| (e.shard, e.owner))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).io_context(|| format!("reading {}", owners_path.display())),
        };
        Ok(Self {
            tier,
            root: root.to_path_buf(),
            owners: Mutex::new(owners),
            capacity,
            keep_last,
            gc_lock: RwLock::new(()),
            unreferenced: AtomicU64::new(0),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Of `ids`, those not stored for `tenant`, or stored but failing a
    /// re-hash (removed, so that the sender writes them again).
    pub async fn missing(&self, tenant: &TenantName, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        self.tier.missing_chunks(tenant, ids).await
    }

    /// Every chunk a held replica names, for scrubbing.
    pub fn referenced_chunks(&self) -> Vec<(TenantName, ChunkId)> {
        self.tier.referenced_chunks()
    }

    /// Re-hashes one held chunk, removing it when bad. Blocking.
    pub fn scrub_chunk(&self, tenant: &TenantName, id: &ChunkId) -> Scrubbed {
        self.tier.scrub_chunk(tenant, id)
    }

    /// Of `ids`, those with no file here (nothing re-hashed).
    pub async fn absent(&self, tenant: &TenantName, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        self.tier.absent_chunks(tenant, ids).await
    }

    /// Checks a received chunk against its id and stores it.
    pub async fn put_chunk(&self, tenant: &TenantName, id: ChunkId, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        let used = self.used_bytes();
        if self.capacity > 0 && used.saturating_add(len) > self.capacity {
            return Err(Error::ResourceExhausted(format!(
                "the replica store is full ({used} of {} bytes used)",
                self.capacity
            )));
        }
        let (data, actual) = tokio::task::spawn_blocking(move || {
            let actual = ChunkId::of(&data);
            (data, actual)
        })
        .await?;
        if actual != id {
            return Err(Error::DataLoss(format!(
                "chunk {id} of tenant {tenant} arrived with different bytes (BLAKE3 {actual}); not stored"
            )));
        }
        // Unsynced: the manifest's arrival syncs the whole batch at once.
        self.tier.store_chunk(tenant, &id, data, false).await?;
        self.unreferenced.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes held: chunks named by replicas, plus those received for
    /// replicas still in flight.
    fn used_bytes(&self) -> u64 {
        self.tier
            .used_bytes()
            .saturating_add(self.unreferenced.load(Ordering::Relaxed))
    }

    /// Stores a replica's manifest and its owner, once every chunk it names
    /// is here; then applies retention to the replicas of the same rank.
    pub async fn put_manifest(&self, manifest: Manifest, owner: Member) -> Result<()> {
        {
            let _no_gc = self.gc_lock.read().await;
            let ids: Vec<ChunkId> = manifest.unique_chunks().into_keys().collect();
            let missing = self.missing(&manifest.shard.tenant, &ids).await?;
            if let Some(first) = missing.first() {
                return Err(Error::FailedPrecondition(format!(
                    "{} of the {} chunks of shard {} are not stored here (first: {first}); send them first",
                    missing.len(),
                    ids.len(),
                    manifest.shard
                )));
            }
            // Every chunk durable before the manifest that names them: one
            // filesystem sync for the replica's chunks written unsynced.
            let root = self.root.clone();
            tokio::task::spawn_blocking(move || fsutil::sync_filesystem(&root)).await??;
            // A different manifest for a shard held here is refused before
            // anything changes (the owner record included), unless it
            // supersedes the stored one (a new save of an incomplete step).
            if let Some(stored) = self.tier.manifest(&manifest.shard).await?
                && stored.hash() != manifest.hash()
                && !manifest.supersedes(&stored)
            {
                return Err(Error::AlreadyExists(format!(
                    "a different replica of shard {} is already stored here",
                    manifest.shard
                )));
            }
            // The owner first: a recorded owner without a manifest is
            // ignored, a manifest without its owner could not be placed
            // again once the owner leaves.
            self.set_owner(manifest.shard.clone(), owner)?;
            self.tier.put_manifest(&manifest).await?;
        }
        let named = manifest
            .unique_chunks()
            .values()
            .fold(0u64, |a, b| a.saturating_add(*b));
        let _ = self
            .unreferenced
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(named))
            });
        self.apply_retention(&PlacementKey::from(&manifest.shard))
    }

    fn set_owner(&self, shard: ShardKey, owner: Member) -> Result<()> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.get(&shard) == Some(&owner) {
            return Ok(());
        }
        owners.insert(shard, owner);
        self.save_owners(&owners)
    }

    fn save_owners(&self, owners: &BTreeMap<ShardKey, Member>) -> Result<()> {
        let entries: Vec<OwnerEntry> = owners
            .iter()
            .map(|(shard, owner)| OwnerEntry {
                shard: shard.clone(),
                owner: owner.clone(),
            })
            .collect();
        let json = serde_json::to_vec(&entries).map_err(|e| Error::Io {
            context: "encoding the replica owners".into(),
            source: std::io::Error::other(e),
        })?;
        fsutil::write_atomic(
            &self.root.join(OWNERS_FILE),
            &self.tier.tmp_path(),
            &json,
            true,
        )
    }

    /// Keeps the newest `keep_last` steps of the rank; older manifests go,
    /// their chunks at the next collection.
    fn apply_retention(&self, key: &PlacementKey) -> Result<()> {
        let mut steps: Vec<ShardKey> = self
            .tier
            .shards()
            .into_iter()
            .map(|m| m.shard.clone())
            .filter(|s| &PlacementKey::from(s) == key)
            .collect();
        steps.sort_by_key(|s| std::cmp::Reverse(s.step));
        let old = steps.split_off(steps.len().min(self.keep_last));
        if old.is_empty() {
            return Ok(());
        }
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        for shard in &old {
            // Chunks only this replica named stay on disk until the next
            // collection; they still count toward the capacity.
            let before = self.tier.used_bytes();
            self.tier.remove_shard(shard)?;
            let released = before.saturating_sub(self.tier.used_bytes());
            self.unreferenced.fetch_add(released, Ordering::Relaxed);
            owners.remove(shard);
            tracing::debug!(%shard, "replica dropped by retention");
        }
        self.save_owners(&owners)
    }

    /// Removes chunks no replica names: those retention released, and
    /// those of copies abandoned half-way (a sender that died or gave up),
    /// once older than `min_age` so that a copy still in flight keeps its
    /// chunks.
    pub async fn collect_garbage(self: &Arc<Self>, min_age: Duration) -> Result<GcReport> {
        let _exclusive = self.gc_lock.write().await;
        let store = Arc::clone(self);
        let (report, young) =
            tokio::task::spawn_blocking(move || store.tier.collect_old_garbage(min_age)).await??;
        self.unreferenced.store(young, Ordering::Relaxed);
        Ok(report)
    }

    /// A replica's manifest.
    pub async fn manifest(&self, key: &ShardKey) -> Result<Option<Arc<Manifest>>> {
        self.tier.manifest(key).await
    }

    /// The replicas held for a tenant (one job, or all).
    pub async fn list(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<Vec<Arc<Manifest>>> {
        self.tier.list(tenant, job).await
    }

    /// Drops the replica of `shard` when `caller` is its recorded owner (a
    /// surplus copy the owner no longer counts); returns whether one was
    /// held. Its chunks go at the next collection.
    pub fn drop_replica(&self, shard: &ShardKey, caller: &NodeId) -> Result<bool> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        match owners.get(shard) {
            None => return Ok(false),
            Some(owner) if &owner.id != caller => {
                return Err(Error::PermissionDenied(format!(
                    "node {caller} asked to drop the replica of shard {shard}, whose owner is node {}",
                    owner.id
                )));
            }
            Some(_) => {}
        }
        let before = self.tier.used_bytes();
        let held = self.tier.remove_shard(shard)?;
        let released = before.saturating_sub(self.tier.used_bytes());
        self.unreferenced.fetch_add(released, Ordering::Relaxed);
        owners.remove(shard);
        self.save_owners(&owners)?;
        Ok(held)
    }

    /// Every replica held, with its owner.
    pub fn replicas(&self) -> Vec<(Arc<Manifest>, Option<Member>)> {
        let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        self.tier
            .shards()
            .into_iter()
            .map(|m| {
                let owner = owners.get(&m.shard).cloned();
                (m, owner)
            })
            .collect()
    }

    /// A chunk's stored bytes.
    pub async fn chunk(&self, tenant: &TenantName, id: &ChunkId) -> Result<Option<Bytes>> {
        self.tier.chunk_bytes(tenant, id).await
    }

    /// The store as a source of verified chunks, for re-replication.
    pub fn source(&self) -> &dyn ShardSource {
        &self.tier
    }

    /// Replicas held and their bytes, for status and metrics.
    pub fn usage(&self) -> (u64, u64) {
        (self.tier.shards().len() as u64, self.used_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use cairn_core::{
        ChunkRef, ChunkSize, FileEntry, FileName, JobName, MANIFEST_VERSION, NodeId, Rank, Step,
    };

    use super::*;

    const CHUNK: u64 = 64 * 1024;

    fn owner() -> Member {
        Member::new(NodeId::parse("owner", "node-a".into()).expect("id")).with_zone("z1")
    }

    /// A one-file manifest of step `step` whose chunks are `chunks`.
    fn manifest(step: u64, chunks: &[Vec<u8>]) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            shard: ShardKey {
                tenant: TenantName::parse("tenant", "t".into()).expect("tenant"),
                job: JobName::parse("job", "j".into()).expect("job"),
                step: Step(step),
                rank: Rank(0),
            },
            world_size: None,
            chunk_size: ChunkSize::new(CHUNK).expect("chunk size"),
            files: vec![FileEntry {
                name: FileName::parse("file", "f.bin".into()).expect("name"),
                size: chunks.iter().map(|c| c.len() as u64).sum(),
                chunks: chunks
                    .iter()
                    .map(|c| ChunkRef {
                        id: ChunkId::of(c),
                        len: c.len() as u64,
                    })
                    .collect(),
                metadata: BTreeMap::new(),
            }],
            metadata: BTreeMap::new(),
            committed_unix_ms: 0,
            attempt: None,
        }
    }

    fn chunk(seed: u8) -> Vec<u8> {
        vec![seed; CHUNK as usize]
    }

    async fn put_all(store: &ReplicaStore, m: &Manifest, chunks: &[Vec<u8>]) {
        for c in chunks {
            store
                .put_chunk(&m.shard.tenant, ChunkId::of(c), Bytes::from(c.clone()))
                .await
                .expect("put chunk");
        }
    }

    #[tokio::test]
    async fn only_the_owner_drops_its_replica() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ReplicaStore::open(dir.path(), 0, 2).expect("open");
        let chunks = vec![chunk(5)];
        let m = manifest(1, &chunks);
        put_all(&store, &m, &chunks).await;
        store
            .put_manifest(m.clone(), owner())
            .await
            .expect("stored");
        let stranger = NodeId::parse("node", "node-z".into()).expect("id");
        let err = store
            .drop_replica(&m.shard, &stranger)
            .expect_err("not the owner");
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        assert!(err.to_string().contains("node-z") && err.to_string().contains("node-a"));
        assert!(store.manifest(&m.shard).await.expect("read").is_some());
        assert!(
            store
                .drop_replica(&m.shard, &owner().id)
                .expect("the owner")
        );
        assert!(store.manifest(&m.shard).await.expect("read").is_none());
        assert!(
            !store
                .drop_replica(&m.shard, &owner().id)
                .expect("nothing left")
        );
        // The owner record went too: a restart does not bring it back.
        drop(store);
        let reopened = ReplicaStore::open(dir.path(), 0, 2).expect("reopen");
        assert!(reopened.replicas().is_empty());
    }

    /// Scrubbing checks the bytes stored (read with O_DIRECT on this disk
    /// directory): a good chunk counts, a rewritten one is removed, and a
    /// file larger than any chunk is removed without being read whole.
    #[tokio::test]
    async fn scrubbing_removes_bad_and_oversized_chunk_files() {
        use crate::tier::disk::Scrubbed;
        let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
        let store = ReplicaStore::open(dir.path(), 0, 2).expect("open");
        let chunks = vec![chunk(1), chunk(2), chunk(3)];
        let m = manifest(1, &chunks);
        put_all(&store, &m, &chunks).await;
        let tenant = &m.shard.tenant;
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        assert_eq!(
            store.tier.scrub_chunk(tenant, &ids[0]),
            Scrubbed::Good(CHUNK)
        );

        let rewritten = store.tier.chunk_path(tenant, &ids[1]);
        std::fs::write(&rewritten, chunk(9)).expect("rewritten");
        assert_eq!(
            store.tier.scrub_chunk(tenant, &ids[1]),
            Scrubbed::Bad(CHUNK)
        );
        assert!(!rewritten.exists());

        let oversized = store.tier.chunk_path(tenant, &ids[2]);
        let huge = cairn_core::chunk::MAX_CHUNK_SIZE + 1;
        std::fs::File::create(&oversized)
            .and_then(|f| f.set_len(huge))
            .expect("sparse file");
        assert_eq!(store.tier.scrub_chunk(tenant, &ids[2]), Scrubbed::Bad(huge));
        assert!(!oversized.exists());
        assert_eq!(store.tier.scrub_chunk(tenant, &ids[2]), Scrubbed::Absent);
    }

    #[tokio::test]
    async fn a_manifest_waits_for_its_chunks_and_bad_chunks_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ReplicaStore::open(dir.path(), 0, 2).expect("open");
        let chunks = vec![chunk(1), chunk(2)];
        let m = manifest(1, &chunks);
        let tenant = m.shard.tenant.clone();

        let wrong = store
            .put_chunk(
                &tenant,
                ChunkId::of(&chunks[0]),
                Bytes::from(chunks[1].clone()),
            )
            .await
            .expect_err("bytes that do not match the id");
        assert!(matches!(wrong, Error::DataLoss(_)), "{wrong:?}");

        store
            .put_chunk(
                &tenant,
                ChunkId::of(&chunks[0]),
                Bytes::from(chunks[0].clone()),
            )
            .await
            .expect("first chunk");
        let early = store
            .put_manifest(m.clone(), owner())
            .await
            .expect_err("one chunk is missing");
        assert!(matches!(early, Error::FailedPrecondition(_)), "{early:?}");
        assert!(store.manifest(&m.shard).await.expect("read").is_none());

        put_all(&store, &m, &chunks).await;
        store
            .put_manifest(m.clone(), owner())
            .await
            .expect("complete");
        assert!(store.manifest(&m.shard).await.expect("read").is_some());

        // The owner survives a restart.
        drop(store);
        let store = ReplicaStore::open(dir.path(), 0, 2).expect("reopen");
        let replicas = store.replicas();
        assert_eq!(replicas.len(), 1);
        assert_eq!(replicas[0].1.as_ref(), Some(&owner()));
    }

    #[tokio::test]
    async fn retention_keeps_the_newest_steps_and_capacity_refuses_more() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(ReplicaStore::open(dir.path(), 4 * CHUNK, 2).expect("open"));
        for step in 1..=3 {
            let chunks = vec![chunk(step as u8)];
            let m = manifest(step, &chunks);
            put_all(&store, &m, &chunks).await;
            store.put_manifest(m, owner()).await.expect("stored");
        }
        let mut steps: Vec<u64> = store
            .replicas()
            .iter()
            .map(|(m, _)| m.shard.step.0)
            .collect();
        steps.sort();
        assert_eq!(steps, vec![2, 3], "keep_last = 2");

        // Two steps of one chunk each plus step 1's released chunk: full at
        // four chunks.
        let tenant = TenantName::parse("tenant", "t".into()).expect("tenant");
        store
            .put_chunk(&tenant, ChunkId::of(&chunk(9)), Bytes::from(chunk(9)))
            .await
            .expect("fourth chunk fits");
        let full = store
            .put_chunk(&tenant, ChunkId::of(&chunk(10)), Bytes::from(chunk(10)))
            .await
            .expect_err("over capacity");
        assert!(full.is_out_of_space(), "{full:?}");

        // Collection removes only chunks older than the bound.
        let report = store
            .collect_garbage(Duration::from_secs(3600))
            .await
            .expect("gc");
        assert_eq!(report.chunks, 0, "everything is younger than an hour");
        let report = store.collect_garbage(Duration::ZERO).await.expect("gc");
        assert_eq!(report.chunks, 2, "step 1's chunk and the unnamed one");
        assert_eq!(store.usage(), (2, 2 * CHUNK));
    }
}
