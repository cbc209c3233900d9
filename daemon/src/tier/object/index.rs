//! The local index of chunks known to be in the bucket.
//!
//! Asking the bucket whether it holds each chunk of a shard costs one HEAD
//! per chunk, per step: thousands of requests for a large shard whose
//! tensors mostly did not change. The index remembers, per tenant and chunk,
//! when the chunk was last written to the bucket, so an unchanged chunk costs
//! nothing on the next step and the bucket is asked only on a miss.
//!
//! It is a cache, persisted as an append-only log so that a restarted daemon
//! resumes an upload without re-sending (or even re-checking) what it had
//! already sent. Entries are only trusted while
//! [`cairn_core::bucket::reusable`] holds, so a chunk the collector may have
//! deleted since is always checked again. The log is keyed by the bucket's
//! URL; after emptying a bucket by hand, delete the index directory too
//! (`docs/operations.md`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cairn_core::{ChunkId, TenantName};

use crate::error::{IoContext, Result};

/// Rewrite the log once it holds this many times more lines than entries.
const COMPACT_FACTOR: usize = 4;

/// Chunks known to be in the bucket, with the Unix second each was written.
pub struct KnownChunks {
    entries: Mutex<HashMap<(TenantName, ChunkId), u64>>,
    log: Option<Mutex<File>>,
}

impl KnownChunks {
    /// An index kept in memory only (tests, or no disk tier).
    pub fn in_memory() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            log: None,
        }
    }

    /// Loads the index for the bucket `url` from `dir`, compacting the log
    /// when it has grown well past its live entries. Unreadable lines are
    /// skipped: the index is a cache, and a missing entry costs one HEAD.
    pub fn open(dir: &Path, url: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
        let name = blake3::hash(url.as_bytes()).to_hex();
        let path = dir.join(format!("{}.known-chunks", &name[..16]));
        let mut entries = HashMap::new();
        let mut lines = 0usize;
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines().map_while(std::io::Result::ok) {
                lines = lines.saturating_add(1);
                apply_line(&mut entries, &line);
            }
        }
        if lines
            > COMPACT_FACTOR
                .saturating_mul(entries.len())
                .saturating_add(1024)
        {
            compact(&path, &entries)?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .io_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            entries: Mutex::new(entries),
            log: Some(Mutex::new(log)),
        })
    }

    /// When `id` was last written to the bucket for `tenant`, if known.
    pub fn written_at(&self, tenant: &TenantName, id: &ChunkId) -> Option<u64> {
        lock(&self.entries).get(&(tenant.clone(), *id)).copied()
    }

    /// Records that the bucket holds `id`, written at `unix_secs`.
    pub fn record(&self, tenant: &TenantName, id: ChunkId, unix_secs: u64) {
        lock(&self.entries).insert((tenant.clone(), id), unix_secs);
        self.append(&format!("+ {tenant} {id} {unix_secs}\n"));
    }

    /// Forgets chunks the collector deleted.
    pub fn forget(&self, tenant: &TenantName, ids: &[ChunkId]) {
        let mut entries = lock(&self.entries);
        let mut text = String::new();
        for id in ids {
            entries.remove(&(tenant.clone(), *id));
            text.push_str(&format!("- {tenant} {id}\n"));
        }
        drop(entries);
        self.append(&text);
    }

    fn append(&self, text: &str) {
        if let Some(log) = &self.log
            && let Err(e) = lock(log).write_all(text.as_bytes())
        {
            tracing::warn!(error = %e, "cannot append to the bucket's chunk index; it is a cache, continuing");
        }
    }
}

fn apply_line(entries: &mut HashMap<(TenantName, ChunkId), u64>, line: &str) {
    let mut parts = line.split(' ');
    let (Some(op), Some(tenant), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let (Ok(tenant), Ok(id)) = (
        TenantName::parse("tenant", tenant.to_owned()),
        id.parse::<ChunkId>(),
    ) else {
        return;
    };
    match (op, parts.next().map(str::parse::<u64>)) {
        ("+", Some(Ok(secs))) => {
            entries.insert((tenant, id), secs);
        }
        ("-", None) => {
            entries.remove(&(tenant, id));
        }
        _ => {}
    }
}

fn compact(path: &Path, entries: &HashMap<(TenantName, ChunkId), u64>) -> Result<()> {
    let mut text = String::with_capacity(entries.len().saturating_mul(100));
    for ((tenant, id), secs) in entries {
        text.push_str(&format!("+ {tenant} {id} {secs}\n"));
    }
    let tmp: PathBuf = path.with_extension("compacting");
    let _ = std::fs::remove_file(&tmp); // left by a crash mid-compaction
    crate::fsutil::write_atomic(path, &tmp, text.as_bytes(), true)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart_and_forgets_collected_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = TenantName::parse("tenant", "t".into()).expect("tenant");
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        {
            let index = KnownChunks::open(dir.path(), "s3://bucket/x").expect("open");
            index.record(&tenant, a, 100);
            index.record(&tenant, b, 200);
            index.forget(&tenant, &[a]);
        }
        let index = KnownChunks::open(dir.path(), "s3://bucket/x").expect("reopen");
        assert_eq!(index.written_at(&tenant, &a), None);
        assert_eq!(index.written_at(&tenant, &b), Some(200));
        // Another bucket has its own index.
        let other = KnownChunks::open(dir.path(), "s3://other").expect("other");
        assert_eq!(other.written_at(&tenant, &b), None);
    }

    #[test]
    fn a_long_log_is_compacted_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = TenantName::parse("tenant", "t".into()).expect("tenant");
        let id = ChunkId::of(b"x");
        {
            let index = KnownChunks::open(dir.path(), "file:///b").expect("open");
            for secs in 0..5000 {
                index.record(&tenant, id, secs);
            }
        }
        let index = KnownChunks::open(dir.path(), "file:///b").expect("reopen");
        assert_eq!(index.written_at(&tenant, &id), Some(4999));
        let log = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "known-chunks"))
            .expect("log");
        assert_eq!(
            std::fs::read_to_string(log.path())
                .expect("read")
                .lines()
                .count(),
            1
        );
    }
}
