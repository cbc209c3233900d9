//! T1, the disk tier: content-addressed chunks and manifests on local disk.
//!
//! Layout under the root:
//!
//! ```text
//! tenants/<tenant>/chunks/<first two hex digits>/<chunk id>
//! tenants/<tenant>/manifests/<job>/<step>/<rank>.manifest
//! tmp/                                  temporary files, same filesystem
//! ```
//!
//! Chunks are stored once per tenant, however many steps or jobs name them,
//! and never shared across tenants. Every write goes to `tmp/`, is fsynced,
//! renamed into place, and its directory fsynced; a manifest is written only
//! after every chunk it names, so a manifest on disk means a complete,
//! durable shard. At start `tmp/` is emptied and manifests whose chunks are
//! not all present are removed. Unreferenced chunks are removed by
//! [`DiskTier::collect_garbage`], which the caller must not run while a copy
//! into this tier is between its chunks and its manifest.
//!
//! A chunk already on disk is reused by every later shard that names it, so
//! a stored chunk that went bad would silently poison each of them. A chunk
//! counts as present for a new copy ([`ChunkSink::missing_chunks`]) only if
//! it was written or re-hashed within the last `reverify_after`; an older one
//! is re-hashed first, and one that fails is removed and reported missing,
//! so the copy writes a good one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::{ChunkId, JobName, Manifest, ShardKey, TenantName};

use super::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};
use crate::error::{Error, IoContext, Result};
use crate::failpoint::fault_point;
use crate::fsutil;

const TENANTS: &str = "tenants";
const CHUNKS: &str = "chunks";
const MANIFESTS: &str = "manifests";
const TMP: &str = "tmp";
const MANIFEST_EXT: &str = "manifest";

/// What re-hashing one stored chunk found (see [`DiskTier::scrub_chunk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scrubbed {
    /// Its bytes match its id (this many bytes read).
    Good(u64),
    /// Its bytes do not match: the file was removed (this many bytes read).
    Bad(u64),
    /// No file (removed meanwhile, or never written).
    Absent,
}

/// What garbage collection found (and removed, unless it was a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unreferenced chunks.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The manifests held, and how many of them name each chunk, so that usage
/// and garbage collection never have to walk every manifest.
#[derive(Default)]
struct Index {
    manifests: BTreeMap<ShardKey, Arc<Manifest>>,
    /// (tenant, chunk) → (length, number of manifests naming it).
    chunk_refs: HashMap<(TenantName, ChunkId), (u64, usize)>,
    referenced_bytes: u64,
}

impl Index {
    fn insert(&mut self, manifest: Arc<Manifest>) {
        if let Some(old) = self
            .manifests
            .insert(manifest.shard.clone(), Arc::clone(&manifest))
        {
            self.release(&old);
        }
        for (id, len) in manifest.unique_chunks() {
            let entry = self
                .chunk_refs
                .entry((manifest.shard.tenant.clone(), id))
                .or_insert((len, 0));
            if entry.1 == 0 {
                self.referenced_bytes = self.referenced_bytes.saturating_add(len);
            }
            entry.1 = entry.1.saturating_add(1);
        }
    }

    fn remove(&mut self, key: &ShardKey) -> bool {
        match self.manifests.remove(key) {
            Some(old) => {
                self.release(&old);
                true
            }
            None => false,
        }
    }

    fn release(&mut self, manifest: &Manifest) {
        for id in manifest.unique_chunks().into_keys() {
            let key = (manifest.shard.tenant.clone(), id);
            if let Some(entry) = self.chunk_refs.get_mut(&key) {
                entry.1 = entry.1.saturating_sub(1);
                if entry.1 == 0 {
                    self.referenced_bytes = self.referenced_bytes.saturating_sub(entry.0);
                    self.chunk_refs.remove(&key);
                }
            }
        }
    }
}

/// Chunks remembered as recently written or checked, at most; past that
/// the record is cleared and chunks are simply checked again.
const MAX_TRUSTED_CHUNKS: usize = 1 << 20;
/// How long a written or checked chunk stays trusted unless configured.
const DEFAULT_REVERIFY_AFTER: Duration = Duration::from_secs(600);

/// Chunks written or re-hashed lately, with when.
#[derive(Default)]
struct TrustedChunks(HashMap<(TenantName, ChunkId), Instant>);

impl TrustedChunks {
    fn record(&mut self, tenant: &TenantName, id: ChunkId) {
        if self.0.len() >= MAX_TRUSTED_CHUNKS {
            self.0.clear();
        }
        self.0.insert((tenant.clone(), id), Instant::now());
    }

    fn forget(&mut self, tenant: &TenantName, id: &ChunkId) {
        self.0.remove(&(tenant.clone(), *id));
    }

    fn trusted(&self, tenant: &TenantName, id: &ChunkId, window: Duration) -> bool {
        self.0
            .get(&(tenant.clone(), *id))
            .is_some_and(|at| at.elapsed() < window)
    }
}

/// The disk tier.
pub struct DiskTier {
    root: PathBuf,
    index: Mutex<Index>,
    trusted: Mutex<TrustedChunks>,
    reverify_after: Duration,
    /// Byte limit: stored chunks plus `reserved` (`u64::MAX`: none).
    capacity: u64,
    /// Bytes reserved by copies into the tier that are in flight.
    reserved: Mutex<u64>,
    _lock: File,
}

/// Space a copy into the disk tier holds until it is done (see
/// [`DiskTier::try_reserve`]); released on drop, when the copied chunks
/// count as stored instead.
pub struct DiskReservation<'a> {
    tier: &'a DiskTier,
    bytes: u64,
}

impl Drop for DiskReservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.tier.lock_reserved();
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

impl DiskTier {
    /// Opens the tier at `root`, cleaning temporaries and dropping manifests
    /// whose chunks are not all present.
    pub fn open(root: &Path) -> Result<Self> {
        let lock = fsutil::lock_dir(root)?;
        let tmp = root.join(TMP);
        fsutil::remove_all(&tmp)?;
        fs::create_dir_all(&tmp).io_context(|| format!("creating {}", tmp.display()))?;
        let tier = Self {
            root: root.to_path_buf(),
            index: Mutex::new(Index::default()),
            trusted: Mutex::new(TrustedChunks::default()),
            reverify_after: DEFAULT_REVERIFY_AFTER,
            capacity: u64::MAX,
            reserved: Mutex::new(0),
            _lock: lock,
        };
        tier.load_manifests()?;
        Ok(tier)
    }

    /// Sets how long a written or checked chunk is reused without being
    /// re-hashed (zero: never).
    pub fn with_reverify_after(mut self, window: Duration) -> Self {
        self.reverify_after = window;
        self
    }

    /// Sets the tier's byte limit.
    pub fn with_capacity(mut self, bytes: u64) -> Self {
        self.capacity = bytes;
        self
    }

    /// The byte limit (`u64::MAX`: none).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved by copies in flight.
    pub fn reserved_bytes(&self) -> u64 {
        *self.lock_reserved()
    }

    fn lock_reserved(&self) -> std::sync::MutexGuard<'_, u64> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `bytes` for a copy into the tier, or says how many bytes
    /// short the tier is (stored chunks and other copies in flight count).
    pub fn try_reserve(&self, bytes: u64) -> std::result::Result<DiskReservation<'_>, u64> {
        let mut reserved = self.lock_reserved();
        let need = self
            .used_bytes()
            .saturating_add(*reserved)
            .saturating_add(bytes);
        if need > self.capacity {
            return Err(need.saturating_sub(self.capacity));
        }
        *reserved = reserved.saturating_add(bytes);
        Ok(DiskReservation { tier: self, bytes })
    }

    fn lock_trusted(&self) -> std::sync::MutexGuard<'_, TrustedChunks> {
        self.trusted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load_manifests(&self) -> Result<()> {
        let tenants = self.root.join(TENANTS);
        let Ok(entries) = fs::read_dir(&tenants) else {
            return Ok(());
        };
        let mut index = self.lock_index();
        for tenant_dir in entries.flatten().map(|e| e.path()) {
            for path in files_under(&tenant_dir.join(MANIFESTS)) {
                match self.check_manifest(&path) {
                    Ok(manifest) => {
                        index.insert(Arc::new(manifest));
                    }
                    Err(reason) => {
                        tracing::warn!(path = %path.display(), %reason, "removing incomplete shard from disk tier");
                        fsutil::remove_all(&path)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn check_manifest(&self, path: &Path) -> std::result::Result<Manifest, String> {
        let bytes = fs::read(path).map_err(|e| e.to_string())?;
        let manifest = Manifest::decode(&bytes).map_err(|e| e.to_string())?;
        if self.manifest_path(&manifest.shard) != path {
            return Err("manifest names another shard".into());
        }
        for id in manifest.unique_chunks().keys() {
            if !self.chunk_path(&manifest.shard.tenant, id).exists() {
                return Err(format!("chunk {id} is missing"));
            }
        }
        Ok(manifest)
    }

    /// The tier's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a chunk of `tenant` is stored.
    pub fn chunk_path(&self, tenant: &TenantName, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root
            .join(TENANTS)
            .join(tenant.as_str())
            .join(CHUNKS)
            .join(&hex[..2])
            .join(hex)
    }

    fn manifest_path(&self, key: &ShardKey) -> PathBuf {
        self.root
            .join(TENANTS)
            .join(key.tenant.as_str())
            .join(MANIFESTS)
            .join(key.job.as_str())
            .join(key.step.0.to_string())
            .join(format!("{}.{MANIFEST_EXT}", key.rank.0))
    }

    /// A fresh temporary file name on the tier's filesystem.
    pub fn tmp_path(&self) -> PathBuf {
        self.root.join(TMP).join(uuid::Uuid::new_v4().to_string())
    }

    /// Whether the shard is complete here.
    pub fn contains(&self, key: &ShardKey) -> bool {
        self.lock_index().manifests.contains_key(key)
    }

    /// Every shard held, for status and retention.
    pub fn shards(&self) -> Vec<Arc<Manifest>> {
        self.lock_index().manifests.values().cloned().collect()
    }

    /// Every chunk a held manifest names, by tenant: what scrubbing
    /// re-hashes (chunks no manifest names are garbage collection's).
    pub fn referenced_chunks(&self) -> Vec<(TenantName, ChunkId)> {
        self.lock_index().chunk_refs.keys().cloned().collect()
    }

    /// Re-hashes one stored chunk. A good one counts as verified now (a new
    /// shard reusing it trusts it for `reverify_after`); a bad one is removed
    /// at once, so that nothing serves it, a holder check reports it absent
    /// and the owner sends it again. Blocking.
    pub fn scrub_chunk(&self, tenant: &TenantName, id: &ChunkId) -> Scrubbed {
        let path = self.chunk_path(tenant, id);
        // With O_DIRECT where the disk takes it: the bytes checked are the
        // device's, not a copy the page cache may still hold, and pass after
        // pass over every chunk does not push the node's useful pages out.
        let (len, good) = match fsutil::read_chunk_file(&path, None) {
            Ok(Some(bytes)) => (bytes.len() as u64, ChunkId::of(&bytes) == *id),
            // Larger than any chunk (refused unread): not this chunk.
            Err(Error::DataLoss(_)) => (fs::metadata(&path).map_or(0, |m| m.len()), false),
            Ok(None) | Err(_) => return Scrubbed::Absent,
        };
        if good {
            self.lock_trusted().record(tenant, *id);
            return Scrubbed::Good(len);
        }
        self.lock_trusted().forget(tenant, id);
        tracing::warn!(%tenant, chunk = %id, path = %path.display(), "scrubbing found a chunk whose bytes do not match its id; removed");
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(chunk = %id, error = %e, "removing a bad chunk failed");
        }
        Scrubbed::Bad(len)
    }

    /// Bytes of all stored chunks (each counted once).
    pub fn used_bytes(&self) -> u64 {
        self.lock_index().referenced_bytes
    }

    /// Removes a shard's manifest. Its chunks stay until garbage collection.
    pub fn remove_shard(&self, key: &ShardKey) -> Result<bool> {
        let removed = self.remove_shards(std::slice::from_ref(key))?;
        Ok(!removed.is_empty())
    }

    /// Removes the manifests of several shards (one step's, for retention or
    /// a delete) and returns those it held. They all leave the index under
    /// one lock before any file goes, so a listing never shows the step half
    /// removed, which would read as a broken step. A crash between the
    /// files leaves the rest listed after the restart, as an incomplete step
    /// that the next retention pass removes.
    pub fn remove_shards(&self, keys: &[ShardKey]) -> Result<Vec<ShardKey>> {
        let removed: Vec<ShardKey> = {
            let mut index = self.lock_index();
            keys.iter().filter(|k| index.remove(k)).cloned().collect()
        };
        let stop = self.root.join(TENANTS);
        for key in &removed {
            // A delay point only (tests hold a removal here to list meanwhile).
            let _ = fault_point("disk.between_shard_removals");
            let path = self.manifest_path(key);
            fsutil::remove_all(&path)?;
            fsutil::prune_empty_dirs(path.parent().unwrap_or(&stop), &stop);
        }
        Ok(removed)
    }

    /// Stores a chunk the caller has verified, by id alone (the peer tier
    /// receives chunks without the manifest they belong to). Without `sync`
    /// the chunk is not durable until the caller syncs the filesystem
    /// ([`fsutil::sync_filesystem`]), which it must do before storing a
    /// manifest that names it.
    pub async fn store_chunk(
        &self,
        tenant: &TenantName,
        id: &ChunkId,
        data: Bytes,
        sync: bool,
    ) -> Result<()> {
        let path = self.chunk_path(tenant, id);
        let tmp = self.tmp_path();
        tokio::task::spawn_blocking(move || fsutil::write_chunk_file(&path, &tmp, &data, sync))
            .await??;
        self.lock_trusted().record(tenant, *id);
        Ok(())
    }

    /// Of `ids`, those with no file here, without checking the ones present:
    /// what a restore asks (it re-hashes every chunk it reads anyway). A copy
    /// into this tier asks [`ChunkSink::missing_chunks`] instead.
    pub async fn absent_chunks(
        &self,
        tenant: &TenantName,
        ids: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        let paths: Vec<(ChunkId, PathBuf)> = ids
            .iter()
            .map(|id| (*id, self.chunk_path(tenant, id)))
            .collect();
        tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .filter(|(_, p)| !p.exists())
                .map(|(id, _)| id)
                .collect()
        })
        .await
        .map_err(Error::from)
    }

    /// A stored chunk's bytes, unverified (`None` when absent): what the
    /// peer tier serves, leaving verification to the reader, who must do it
    /// anyway.
    pub async fn chunk_bytes(&self, tenant: &TenantName, id: &ChunkId) -> Result<Option<Bytes>> {
        let path = self.chunk_path(tenant, id);
        tokio::task::spawn_blocking(move || fsutil::read_chunk_file(&path, None)).await?
    }

    /// Removes chunks that no manifest of their tenant references (or only
    /// counts them, on a dry run). Blocking: run it off the async threads.
    pub fn collect_garbage(&self, dry_run: bool) -> Result<GcReport> {
        self.sweep(dry_run, None).map(|(report, _)| report)
    }

    /// Removes unreferenced chunks written at least `min_age` ago, leaving
    /// younger ones (those of a copy still in flight, whose manifest has
    /// not arrived); returns what it removed and the bytes it left.
    /// Blocking.
    pub fn collect_old_garbage(&self, min_age: std::time::Duration) -> Result<(GcReport, u64)> {
        self.sweep(false, Some(min_age))
    }

    fn sweep(
        &self,
        dry_run: bool,
        min_age: Option<std::time::Duration>,
    ) -> Result<(GcReport, u64)> {
        let referenced: HashSet<(String, String)> = self
            .lock_index()
            .chunk_refs
            .keys()
            .map(|(tenant, id)| (tenant.as_str().to_owned(), id.to_hex()))
            .collect();
        let mut report = GcReport::default();
        let mut young = 0;
        let Ok(tenants) = fs::read_dir(self.root.join(TENANTS)) else {
            return Ok((report, young));
        };
        for tenant_dir in tenants.flatten() {
            let tenant = tenant_dir.file_name().to_string_lossy().into_owned();
            for path in files_under(&tenant_dir.path().join(CHUNKS)) {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if referenced.contains(&(tenant.clone(), name)) {
                    continue;
                }
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                let age = meta.modified().ok().and_then(|t| t.elapsed().ok());
                if let Some(min_age) = min_age
                    && age.is_none_or(|age| age < min_age)
                {
                    young = young.saturating_add(meta.len());
                    continue;
                }
                report.chunks = report.chunks.saturating_add(1);
                report.bytes = report.bytes.saturating_add(meta.len());
                if !dry_run {
                    fsutil::remove_all(&path)?;
                }
            }
        }
        Ok((report, young))
    }
}

/// Regular files anywhere below `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => out.push(entry.path()),
                _ => {}
            }
        }
    }
    out
}

/// Whether the file at `path` hashes to `id` (unreadable counts as no).
fn chunk_file_matches(path: &Path, id: &ChunkId) -> bool {
    fs::read(path).is_ok_and(|bytes| ChunkId::of(&bytes) == *id)
}

#[async_trait]
impl ShardSource for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    async fn manifest(&self, key: &ShardKey) -> Result<Option<Arc<Manifest>>> {
        Ok(self.lock_index().manifests.get(key).cloned())
    }

    async fn list(&self, tenant: &TenantName, job: Option<&JobName>) -> Result<Vec<Arc<Manifest>>> {
        Ok(self
            .lock_index()
            .manifests
            .values()
            .filter(|m| &m.shard.tenant == tenant && job.is_none_or(|j| &m.shard.job == j))
            .cloned()
            .collect())
    }

    async fn read_chunk(&self, location: &ChunkLocation) -> Result<ChunkRead> {
        let path = self.chunk_path(&location.shard().tenant, &location.chunk.id);
        let chunk = location.chunk;
        tokio::task::spawn_blocking(move || {
            Ok(ChunkRead::check(
                fsutil::read_chunk_file(&path, Some(chunk.len))?,
                chunk.id,
            ))
        })
        .await?
    }

    async fn read_chunk_unchecked(&self, location: &ChunkLocation) -> Result<Option<Bytes>> {
        let path = self.chunk_path(&location.shard().tenant, &location.chunk.id);
        let len = location.chunk.len;
        tokio::task::spawn_blocking(move || fsutil::read_chunk_file(&path, Some(len))).await?
    }
}

#[async_trait]
impl ChunkSink for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    /// Chunks absent, and chunks present but not trusted (written or checked
    /// longer than `reverify_after` ago) that fail a re-hash: those are
    /// removed, so the copy asking writes a good one.
    async fn missing_chunks(&self, tenant: &TenantName, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let window = self.reverify_after;
        let paths: Vec<(ChunkId, PathBuf, bool)> = {
            let trusted = self.lock_trusted();
            ids.iter()
                .map(|id| {
                    let trust = trusted.trusted(tenant, id, window);
                    (*id, self.chunk_path(tenant, id), trust)
                })
                .collect()
        };
        let checked = tokio::task::spawn_blocking(move || {
            let mut missing = Vec::new();
            let mut good = Vec::new();
            for (id, path, trust) in paths {
                if !path.exists() {
                    missing.push(id);
                } else if trust {
                    continue;
                } else if chunk_file_matches(&path, &id) {
                    good.push(id);
                } else {
                    tracing::warn!(chunk = %id, path = %path.display(), "a stored chunk failed verification; removing it so that it is written again");
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(chunk = %id, error = %e, "removing a bad chunk failed");
                    }
                    missing.push(id);
                }
            }
            (missing, good)
        })
        .await?;
        let (missing, good) = checked;
        let mut trusted = self.lock_trusted();
        for id in good {
            trusted.record(tenant, id);
        }
        Ok(missing)
    }

    async fn put_chunk(&self, location: &ChunkLocation, data: Bytes) -> Result<()> {
        self.store_chunk(&location.shard().tenant, &location.chunk.id, data, true)
            .await
    }

    async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let key = manifest.shard.clone();
        if let Some(existing) = self.lock_index().manifests.get(&key)
            && existing.hash() != manifest.hash()
            && !manifest.supersedes(existing)
        {
            return Err(Error::AlreadyExists(format!(
                "disk tier already holds a different manifest for shard {key}"
            )));
        }
        let path = self.manifest_path(&key);
        let tmp = self.tmp_path();
        let encoded = manifest.encode();
        tokio::task::spawn_blocking(move || fsutil::write_atomic(&path, &tmp, &encoded, true))
            .await??;
        self.lock_index().insert(Arc::new(manifest.clone()));
        Ok(())
    }
}
