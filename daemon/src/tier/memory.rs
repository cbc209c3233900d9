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
//! The tier tracks its bytes (committed shards, reservations for open
//! sessions, and the page pool) against a capacity; callers reserve before
//! staging and decide what to evict when a reservation does not fit.
//!
//! **The page pool.** Writing into a new tmpfs file pays for page
//! allocation; writing over pages a file already has is about twice as fast
//! (and far steadier on virtual machines). So files of evicted and deleted
//! shards are not unlinked but renamed into `pool/`, up to a byte limit, and
//! `stage` hands them out again (cut to size) for the next save. Files whose
//! paths were handed to a reader by a restore are never recycled: a reader
//! may still map them, and must never see their bytes change. Shards found
//! at start are treated the same way, since a reader from before the restart
//! may still map them. When space runs short the pool is the first thing
//! dropped.
//!
//! **Adopted files.** Ingest of a CSI volume (on the same tmpfs) stages hard
//! links to the files a pod wrote instead of new files (`stage_link_fd`): the
//! bytes exist once, under the pod's name and the shard's. A file with
//! another link is never recycled into the pool, since the pod (or a
//! pre-filled volume) still sees it; it is unlinked with its shard instead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Seek;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::{FileName, JobName, Manifest, ShardKey, TenantName};

use super::{ChunkLocation, ChunkRead, ShardSource, TierKind};
use crate::error::{Error, IoContext, Result};
use crate::failpoint::crash_point;
use crate::fsutil;

const STAGING: &str = "staging";
const SHARDS: &str = cairn_core::ingest::MEMORY_SHARDS_DIR;
const MANIFEST: &str = "manifest";
const FILES: &str = "files";
const POOL: &str = "pool";

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
    /// Bytes held by recycled files waiting to be reused.
    pub pool: u64,
}

/// A recycled file: its pages still exist and can be overwritten.
struct PoolFile {
    path: PathBuf,
    size: u64,
}

#[derive(Default)]
struct State {
    shards: BTreeMap<ShardKey, Arc<Manifest>>,
    /// Shards whose paths a restore handed out: never recycled.
    exported: HashSet<ShardKey>,
    committed_bytes: u64,
    reservations: HashMap<String, u64>,
    pool: Vec<PoolFile>,
    pool_bytes: u64,
}

impl State {
    fn used(&self) -> u64 {
        self.reservations.values().fold(
            self.committed_bytes.saturating_add(self.pool_bytes),
            |a, b| a.saturating_add(*b),
        )
    }

    /// Takes the smallest pool file of at least `size` bytes, else the
    /// largest one (partly warm is better than cold).
    fn take_pool_file(&mut self, size: u64) -> Option<PoolFile> {
        let index = self
            .pool
            .iter()
            .enumerate()
            .filter(|(_, f)| f.size >= size)
            .min_by_key(|(_, f)| f.size)
            .or_else(|| self.pool.iter().enumerate().max_by_key(|(_, f)| f.size))
            .map(|(i, _)| i)?;
        let file = self.pool.swap_remove(index);
        self.pool_bytes = self.pool_bytes.saturating_sub(file.size);
        Some(file)
    }
}

/// The memory tier.
pub struct MemoryTier {
    root: PathBuf,
    capacity: u64,
    pool_limit: u64,
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
    /// is not complete. Up to `pool_limit` bytes of evicted files are kept
    /// for reuse.
    pub fn open(root: &Path, capacity: u64, pool_limit: u64) -> Result<Self> {
        let lock = fsutil::lock_dir(root)?;
        let staging = root.join(STAGING);
        fsutil::remove_all(&staging)?;
        fs::create_dir_all(&staging).io_context(|| format!("creating {}", staging.display()))?;
        let pool = root.join(POOL);
        fs::create_dir_all(&pool).io_context(|| format!("creating {}", pool.display()))?;
        let tier = Self {
            root: root.to_path_buf(),
            capacity,
            pool_limit,
            state: Mutex::new(State::default()),
            _lock: lock,
        };
        tier.load_shards()?;
        tier.load_pool(&pool);
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
                    state.committed_bytes =
                        state.committed_bytes.saturating_add(manifest.total_bytes());
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

    /// Takes back the pool files a previous run left.
    fn load_pool(&self, pool: &Path) {
        let mut state = self.lock_state();
        for entry in fs::read_dir(pool).into_iter().flatten().flatten() {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            state.pool_bytes = state.pool_bytes.saturating_add(size);
            state.pool.push(PoolFile {
                path: entry.path(),
                size,
            });
        }
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

    /// The length of the path a staged file named `name` gets, for a
    /// staging id of `id_len` bytes: lets a caller size the reply that names
    /// every staged file before anything is created.
    pub fn staged_path_len(&self, id_len: usize, name: &FileName) -> usize {
        let root = self.root.as_os_str().len();
        // <root>/staging/<id>/files/<name>
        [STAGING.len(), id_len, FILES.len(), name.as_str().len(), 4]
            .into_iter()
            .fold(root, usize::saturating_add)
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
            reserved: state
                .reservations
                .values()
                .fold(0, |a, b| a.saturating_add(*b)),
            staging_areas: state.reservations.len(),
            shards: state.shards.len(),
            pool: state.pool_bytes,
        }
    }

    /// Reserves `bytes` for staging area `id`. On failure returns how many
    /// bytes would have to be freed first.
    /// Pool files are dropped first when the reservation would not fit.
    pub fn try_reserve(&self, id: &str, bytes: u64) -> std::result::Result<(), u64> {
        let mut state = self.lock_state();
        // Pool files this save will reuse turn into its reservation, so only
        // what goes beyond them has to fit. Pool bytes beyond what this save
        // can reuse are dropped first when space is short.
        // Checked: `bytes` comes from a client's declared sizes.
        let fits = |s: &State| {
            s.used()
                .checked_add(bytes)
                .is_some_and(|need| need <= self.capacity.saturating_add(s.pool_bytes.min(bytes)))
        };
        while !fits(&state) && state.pool_bytes > bytes {
            let Some(file) = state.pool.pop() else { break };
            state.pool_bytes = state.pool_bytes.saturating_sub(file.size);
            if let Err(e) = fs::remove_file(&file.path) {
                tracing::warn!(path = %file.path.display(), error = %e, "removing pool file failed");
            }
        }
        if !fits(&state) {
            return Err(state
                .used()
                .saturating_add(bytes)
                .saturating_sub(self.capacity)
                .saturating_sub(state.pool_bytes.min(bytes)));
        }
        state.reservations.insert(id.to_owned(), bytes);
        Ok(())
    }

    /// Creates staging area `id` with one pre-sized file per entry and returns
    /// their paths. The caller must have reserved the bytes.
    ///
    /// Files come from the page pool when it has any (largest files first,
    /// so big tensors get the warm pages), cut or grown to size.
    pub fn stage(&self, id: &str, files: &[(FileName, u64)]) -> Result<Vec<PathBuf>> {
        let dir = self.staging_dir(id).join(FILES);
        let paths: Vec<PathBuf> = files
            .iter()
            .map(|(name, _)| join_name(&dir, name))
            .collect();
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(files[i].1));
        for i in order {
            let (path, size) = (&paths[i], files[i].1);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .io_context(|| format!("creating {}", parent.display()))?;
            }
            let recycled = self.lock_state().take_pool_file(size);
            let file = match recycled {
                Some(pooled) => {
                    fs::rename(&pooled.path, path).io_context(|| {
                        format!("reusing {} as {}", pooled.path.display(), path.display())
                    })?;
                    OpenOptions::new().write(true).open(path)
                }
                None => OpenOptions::new().write(true).create_new(true).open(path),
            }
            .io_context(|| format!("creating {}", path.display()))?;
            file.set_len(size)
                .io_context(|| format!("sizing {}", path.display()))?;
        }
        Ok(paths)
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
        state.committed_bytes = state.committed_bytes.saturating_add(manifest.total_bytes());
        state.shards.insert(manifest.shard.clone(), manifest);
        Ok(())
    }

    /// Hard-links the open file `file` into staging area `id` as `name`:
    /// exactly the inode behind the descriptor (an `O_PATH` one will do),
    /// through `/proc/self/fd`, so no path a pod can change in the meantime
    /// is resolved again. Returns the staged path.
    pub fn stage_link_fd(
        &self,
        id: &str,
        name: &FileName,
        file: std::os::fd::BorrowedFd<'_>,
    ) -> Result<PathBuf> {
        use std::os::fd::AsRawFd;
        let path = join_name(&self.staging_dir(id).join(FILES), name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).io_context(|| format!("creating {}", parent.display()))?;
        }
        let source = format!("/proc/self/fd/{}", file.as_raw_fd());
        rustix::fs::linkat(
            rustix::fs::CWD,
            source.as_str(),
            rustix::fs::CWD,
            &path,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
        .map_err(|errno| Error::Io {
            context: format!("hard-linking {name} into {}", path.display()),
            source: errno.into(),
        })?;
        Ok(path)
    }

    /// Removes staging area `id` and releases its reservation.
    pub fn discard_staged(&self, id: &str) -> Result<()> {
        let result = fsutil::remove_all(&self.staging_dir(id));
        self.lock_state().reservations.remove(id);
        result
    }

    /// Marks a shard's files as handed to a reader: they will be unlinked,
    /// never recycled, when the shard leaves the tier.
    pub fn mark_exported(&self, key: &ShardKey) {
        self.lock_state().exported.insert(key.clone());
    }

    /// Removes a committed shard, moving its files into the page pool when
    /// no reader was given them and the pool has room. Returns whether the
    /// shard was there.
    pub fn evict(&self, key: &ShardKey) -> Result<bool> {
        let (manifest, exported) = {
            let mut state = self.lock_state();
            let Some(manifest) = state.shards.remove(key) else {
                return Ok(false);
            };
            state.committed_bytes = state.committed_bytes.saturating_sub(manifest.total_bytes());
            (manifest, state.exported.remove(key))
        };
        let dir = self.shard_dir(key);
        if !exported {
            for file in manifest.files.iter().filter(|f| f.size > 0) {
                let from = join_name(&dir.join(FILES), &file.name);
                // A file with another hard link (ingested from, or
                // prefilled into, a CSI volume) is still visible to a pod:
                // recycling it would let the next save overwrite what the
                // pod reads. It is unlinked with the directory instead.
                if fs::symlink_metadata(&from).is_ok_and(|m| m.nlink() > 1) {
                    continue;
                }
                let mut state = self.lock_state();
                if state.pool_bytes.saturating_add(file.size) > self.pool_limit {
                    break;
                }
                let to = self.root.join(POOL).join(uuid::Uuid::new_v4().to_string());
                if fs::rename(&from, &to).is_ok() {
                    state.pool_bytes = state.pool_bytes.saturating_add(file.size);
                    state.pool.push(PoolFile {
                        path: to,
                        size: file.size,
                    });
                }
            }
        }
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

    /// Whether the shard is complete here.
    pub fn contains(&self, key: &ShardKey) -> bool {
        self.lock_state().shards.contains_key(key)
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

/// Reads `len` bytes of `path` at `offset` without checking them; `None`
/// when the file is gone or shorter.
fn read_unchecked(path: &Path, offset: u64, len: u64) -> Result<Option<Bytes>> {
    let Some(mut file) = fsutil::open_chunk_file(path, false)? else {
        return Ok(None);
    };
    file.seek(std::io::SeekFrom::Start(offset))
        .io_context(|| format!("reading {}", path.display()))?;
    let len = usize::try_from(len).map_err(|_| {
        Error::InvalidArgument(format!("a chunk of {len} bytes does not fit in memory"))
    })?;
    fsutil::read_to_len(file, len, path)
}

impl MemoryTier {
    /// The path of the committed file holding `location`'s chunk; `None`
    /// when the tier does not hold the shard.
    fn committed_file_of(&self, location: &ChunkLocation) -> Option<PathBuf> {
        self.lookup(location.shard())?;
        Some(self.file_path(
            location.shard(),
            &location.manifest.files[location.file_index].name,
        ))
    }
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
        let Some(path) = self.committed_file_of(location) else {
            return Ok(ChunkRead::Missing);
        };
        let (offset, chunk) = (location.offset, location.chunk);
        tokio::task::spawn_blocking(move || {
            Ok(ChunkRead::check(
                read_unchecked(&path, offset, chunk.len)?,
                chunk.id,
            ))
        })
        .await?
    }

    /// The bytes as they are: no hash, and no zeroed buffer to read into.
    async fn read_chunk_unchecked(&self, location: &ChunkLocation) -> Result<Option<Bytes>> {
        let Some(path) = self.committed_file_of(location) else {
            return Ok(None);
        };
        let (offset, len) = (location.offset, location.chunk.len);
        tokio::task::spawn_blocking(move || read_unchecked(&path, offset, len)).await?
    }
}
