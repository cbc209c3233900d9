//! T0, the memory tier: a directory on tmpfs holding shards as whole files.
//!
//! Layout under the root:
//!
//! ```text
//! staging/<id>/files/<name>        files being written (save sessions, refills)
//! staging/<id>/manifest            written at commit, just before the rename
//! shards/<tenant>/<job>/<step>/<rank>/{manifest,files/<name>}
//! ```
//!
//! A save writes into `staging/<id>`; commit writes the manifest there and
//! renames the whole directory into `shards/`, so a shard appears complete or
//! not at all. At start every `staging/` entry is removed and every shard
//! directory whose manifest is missing, corrupt, or disagrees with its files'
//! sizes is removed too: nothing partial is ever listed. tmpfs has no
//! durability to gain from fsync, so none is done here; "durable in T0"
//! means "survives a crash of cairnd or the trainer", not a reboot.
//!
//! The tier tracks its bytes (committed shards plus reservations for open
//! sessions) against a capacity; callers reserve before staging and decide
//! what to evict when a reservation does not fit.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::{ChunkId, FileName, JobName, Manifest, ShardKey, TenantName};

use super::{ChunkLocation, ChunkRead, ShardSource, TierKind};
use crate::error::{Error, IoContext, Result};
use crate::failpoint::crash_point;
use crate::fsutil;

const STAGING: &str = "staging";
const SHARDS: &str = "shards";
const MANIFEST: &str = "manifest";
const FILES: &str = "files";

/// Bytes in use, for status and for "tier full" messages.
#[derive(Clone, Debug, Default)]
pub struct MemoryUsage {
    /// Committed shards plus reservations.
    pub used: u64,
    /// The byte limit.
    pub capacity: u64,
    /// Bytes reserved by open sessions and refills.
    pub reserved: u64,
    /// Number of staging areas holding reservations.
    pub staging_areas: usize,
    /// Committed shards.
    pub shards: usize,
}

#[derive(Default)]
struct State {
    shards: BTreeMap<ShardKey, Arc<Manifest>>,
    committed_bytes: u64,
    reservations: HashMap<String, u64>,
}

impl State {
    fn used(&self) -> u64 {
        self.committed_bytes + self.reservations.values().sum::<u64>()
    }
}

/// The memory tier.
pub struct MemoryTier {
    root: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    _lock: File,
}

fn join_name(dir: &Path, name: &FileName) -> PathBuf {
    let mut path = dir.to_path_buf();
    path.extend(name.segments());
    path
}

impl MemoryTier {
    /// Opens the tier at `root`, removing staging leftovers and any shard that
    /// is not complete.
    pub fn open(root: &Path, capacity: u64) -> Result<Self> {
        let lock = fsutil::lock_dir(root)?;
        let staging = root.join(STAGING);
        fsutil::remove_all(&staging)?;
        fs::create_dir_all(&staging).io_context(|| format!("creating {}", staging.display()))?;
        let tier = Self {
            root: root.to_path_buf(),
            capacity,
            state: Mutex::new(State::default()),
            _lock: lock,
        };
        tier.load_shards()?;
        Ok(tier)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug; keep serving with
        // the state as it was rather than poisoning every later request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Walks `shards/` four levels deep and keeps the shards that check out.
    fn load_shards(&self) -> Result<()> {
        let shards_root = self.root.join(SHARDS);
        fs::create_dir_all(&shards_root)
            .io_context(|| format!("creating {}", shards_root.display()))?;
        let mut state = self.lock_state();
        for rank_dir in dirs_at_depth(&shards_root, 4) {
            match self.check_shard_dir(&shards_root, &rank_dir) {
                Ok(manifest) => {
                    state.committed_bytes += manifest.total_bytes();
                    state
                        .shards
                        .insert(manifest.shard.clone(), Arc::new(manifest));
                }
                Err(reason) => {
                    tracing::warn!(path = %rank_dir.display(), %reason, "removing incomplete shard from memory tier");
                    fsutil::remove_all(&rank_dir)?;
                    fsutil::prune_empty_dirs(
                        rank_dir.parent().unwrap_or(&shards_root),
                        &shards_root,
                    );
                }
            }
        }
        Ok(())
    }

    fn check_shard_dir(
        &self,
        shards_root: &Path,
        dir: &Path,
    ) -> std::result::Result<Manifest, String> {
        let bytes = fs::read(dir.join(MANIFEST)).map_err(|e| format!("no manifest: {e}"))?;
        let manifest = Manifest::decode(&bytes).map_err(|e| e.to_string())?;
        if self.shard_dir(&manifest.shard) != dir || !dir.starts_with(shards_root) {
            return Err("manifest names another shard".into());
        }
        for file in &manifest.files {
            let path = join_name(&dir.join(FILES), &file.name);
            match fs::metadata(&path) {
                Ok(meta) if meta.len() == file.size => {}
                _ => {
                    return Err(format!(
                        "file {} is missing or has the wrong size",
                        file.name
                    ));
                }
            }
        }
        Ok(manifest)
    }

    /// The tier's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn shard_dir(&self, key: &ShardKey) -> PathBuf {
        self.root
            .join(SHARDS)
            .join(key.tenant.as_str())
            .join(key.job.as_str())
            .join(key.step.0.to_string())
            .join(key.rank.0.to_string())
    }

    fn staging_dir(&self, id: &str) -> PathBuf {
        self.root.join(STAGING).join(id)
    }

    /// Path of a committed shard's file.
    pub fn file_path(&self, key: &ShardKey, name: &FileName) -> PathBuf {
        join_name(&self.shard_dir(key).join(FILES), name)
    }

    /// Paths of all files of a committed shard, in manifest order.
    pub fn file_paths(&self, manifest: &Manifest) -> Vec<PathBuf> {
        manifest
            .files
            .iter()
            .map(|f| self.file_path(&manifest.shard, &f.name))
            .collect()
    }

    /// Current usage.
    pub fn usage(&self) -> MemoryUsage {
        let state = self.lock_state();
        MemoryUsage {
            used: state.used(),
            capacity: self.capacity,
            reserved: state.reservations.values().sum(),
            staging_areas: state.reservations.len(),
            shards: state.shards.len(),
        }
    }

    /// Reserves `bytes` for staging area `id`. On failure returns how many
    /// bytes would have to be freed first.
    pub fn try_reserve(&self, id: &str, bytes: u64) -> std::result::Result<(), u64> {
        let mut state = self.lock_state();
        let used = state.used();
        if used + bytes > self.capacity {
            return Err(used + bytes - self.capacity);
        }
        state.reservations.insert(id.to_owned(), bytes);
        Ok(())
    }

    /// Creates staging area `id` with one pre-sized file per entry and returns
    /// their paths. The caller must have reserved the bytes.
    pub fn stage(&self, id: &str, files: &[(FileName, u64)]) -> Result<Vec<PathBuf>> {
        let dir = self.staging_dir(id).join(FILES);
        let mut paths = Vec::with_capacity(files.len());
        for (name, size) in files {
            let path = join_name(&dir, name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .io_context(|| format!("creating {}", parent.display()))?;
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .io_context(|| format!("creating {}", path.display()))?;
            file.set_len(*size)
                .io_context(|| format!("sizing {}", path.display()))?;
            paths.push(path);
        }
        Ok(paths)
    }

    /// Opens the staged files of `id` for writing (refills and streamed saves).
    pub fn open_staged(&self, id: &str, manifest_files: &[FileName]) -> Result<Vec<File>> {
        let dir = self.staging_dir(id).join(FILES);
        manifest_files
            .iter()
            .map(|name| {
                let path = join_name(&dir, name);
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .io_context(|| format!("opening {}", path.display()))
            })
            .collect()
    }

    /// Makes staging area `id` the committed shard `manifest` describes: the
    /// manifest is written into the staging area, then the whole area is
    /// renamed into place. Fails with `AlreadyExists` if the shard exists.
    pub fn commit_staged(&self, id: &str, manifest: Arc<Manifest>) -> Result<()> {
        let staging = self.staging_dir(id);
        let target = self.shard_dir(&manifest.shard);
        fs::write(staging.join(MANIFEST), manifest.encode())
            .io_context(|| format!("writing manifest into {}", staging.display()))?;
        crash_point("commit.after_manifest");
        let parent = target.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).io_context(|| format!("creating {}", parent.display()))?;
        let mut state = self.lock_state();
        if state.shards.contains_key(&manifest.shard) || target.exists() {
            return Err(Error::AlreadyExists(format!(
                "shard {} is already committed",
                manifest.shard
            )));
        }
        fs::rename(&staging, &target)
            .io_context(|| format!("renaming {} to {}", staging.display(), target.display()))?;
        state.reservations.remove(id);
        state.committed_bytes += manifest.total_bytes();
        state.shards.insert(manifest.shard.clone(), manifest);
        Ok(())
    }

    /// Removes staging area `id` and releases its reservation.
    pub fn discard_staged(&self, id: &str) -> Result<()> {
        let result = fsutil::remove_all(&self.staging_dir(id));
        self.lock_state().reservations.remove(id);
        result
    }

    /// Removes a committed shard. Returns whether it was there.
    pub fn evict(&self, key: &ShardKey) -> Result<bool> {
        let removed = {
            let mut state = self.lock_state();
            let removed = state.shards.remove(key);
            if let Some(m) = &removed {
                state.committed_bytes -= m.total_bytes();
            }
            removed
        };
        if removed.is_none() {
            return Ok(false);
        }
        let dir = self.shard_dir(key);
        fsutil::remove_all(&dir)?;
        let shards_root = self.root.join(SHARDS);
        fsutil::prune_empty_dirs(dir.parent().unwrap_or(&shards_root), &shards_root);
        Ok(true)
    }

    /// Overwrites one chunk of a committed shard's file (repair in place).
    pub fn write_chunk_in_place(&self, location: &ChunkLocation, data: &[u8]) -> Result<()> {
        let name = &location.manifest.files[location.file_index].name;
        let path = self.file_path(location.shard(), name);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .io_context(|| format!("opening {}", path.display()))?;
        file.write_all_at(data, location.offset)
            .io_context(|| format!("repairing {} at offset {}", path.display(), location.offset))
    }

    /// Committed shards, oldest commit first, for eviction decisions.
    pub fn shards(&self) -> Vec<Arc<Manifest>> {
        let mut all: Vec<_> = self.lock_state().shards.values().cloned().collect();
        all.sort_by_key(|m| m.committed_unix_ms);
        all
    }

    fn lookup(&self, key: &ShardKey) -> Option<Arc<Manifest>> {
        self.lock_state().shards.get(key).cloned()
    }
}

/// Directories exactly `depth` levels below `root`.
fn dirs_at_depth(root: &Path, depth: usize) -> Vec<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..depth {
        level = level
            .iter()
            .filter_map(|d| fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.path())
            .collect();
    }
    level
}

/// Reads `len` bytes at `offset` of `path` and checks them against `id`.
pub(crate) fn read_verified(path: &Path, offset: u64, len: u64, id: ChunkId) -> Result<ChunkRead> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ChunkRead::Missing),
        Err(e) => return Err(e).io_context(|| format!("opening {}", path.display())),
    };
    let mut buf = vec![0u8; len as usize];
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(ChunkRead::Missing),
        Err(e) => return Err(e).io_context(|| format!("reading {}", path.display())),
    }
    if ChunkId::of(&buf) != id {
        return Ok(ChunkRead::Corrupt);
    }
    Ok(ChunkRead::Verified(Bytes::from(buf)))
}

#[async_trait]
impl ShardSource for MemoryTier {
    fn kind(&self) -> TierKind {
        TierKind::Memory
    }

    async fn manifest(&self, key: &ShardKey) -> Result<Option<Arc<Manifest>>> {
        Ok(self.lookup(key))
    }

    async fn list(&self, tenant: &TenantName, job: Option<&JobName>) -> Result<Vec<Arc<Manifest>>> {
        Ok(self
            .lock_state()
            .shards
            .values()
            .filter(|m| &m.shard.tenant == tenant && job.is_none_or(|j| &m.shard.job == j))
            .cloned()
            .collect())
    }

    async fn read_chunk(&self, location: &ChunkLocation) -> Result<ChunkRead> {
        if self.lookup(location.shard()).is_none() {
            return Ok(ChunkRead::Missing);
        }
        let path = self.file_path(
            location.shard(),
            &location.manifest.files[location.file_index].name,
        );
        let (offset, chunk) = (location.offset, location.chunk);
        tokio::task::spawn_blocking(move || read_verified(&path, offset, chunk.len, chunk.id))
            .await?
    }
}
