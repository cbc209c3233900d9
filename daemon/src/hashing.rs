//! Hashing files in place, in parallel, off the async threads.
//!
//! Commit hashes the files the client wrote directly in tmpfs: each file is
//! memory-mapped (no copy) and its chunks are hashed on rayon's pool, one
//! chunk per task, so hashing scales with cores. Callers run these functions
//! inside `spawn_blocking`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use cairn_core::{ChunkId, ChunkRef, ChunkSize, Manifest, chunk_ranges};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};

/// Files mapped at once while hashing a shard: bounds the descriptors and
/// memory maps a commit holds however many files the shard has (the
/// process's map count limit is about 65,000 by default).
const FILES_MAPPED_AT_ONCE: usize = 1024;

/// A read-only map of a whole file; `None` for an empty file (which cannot
/// be mapped and has no chunks). The descriptor is closed once mapped.
fn map_file(path: &Path) -> Result<Option<Mmap>> {
    let file = File::open(path).io_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .io_context(|| format!("reading size of {}", path.display()))?
        .len();
    if len == 0 {
        return Ok(None);
    }
    #[allow(unsafe_code)]
    // SAFETY: the file lives in a Cairn directory that only the daemon and
    // the client of the session write; the session is closed by now, so
    // nobody should modify or truncate it while it is mapped. If a
    // misbehaving client writes anyway, the hash covers whatever bytes were
    // read and every later read re-verifies them.
    let map = unsafe { Mmap::map(&file) }.io_context(|| format!("mapping {}", path.display()))?;
    Ok(Some(map))
}

/// Hashes each file at `chunk_size`, after checking that it still has the
/// size the client declared. Returns each file's chunk list. Files are
/// mapped [`FILES_MAPPED_AT_ONCE`] at a time; the chunks of each batch are
/// hashed in parallel.
pub fn hash_files(
    files: &[(String, PathBuf, u64)],
    chunk_size: ChunkSize,
) -> Result<Vec<Vec<ChunkRef>>> {
    for (name, path, declared) in files {
        let actual = std::fs::metadata(path)
            .io_context(|| format!("reading size of {}", path.display()))?
            .len();
        if actual != *declared {
            return Err(Error::InvalidArgument(format!(
                "file {name}: declared {declared} bytes but the file holds {actual}"
            )));
        }
    }
    let mut out = Vec::with_capacity(files.len());
    for batch in files.chunks(FILES_MAPPED_AT_ONCE) {
        out.extend(hash_batch(batch, chunk_size)?);
    }
    Ok(out)
}

fn hash_batch(
    files: &[(String, PathBuf, u64)],
    chunk_size: ChunkSize,
) -> Result<Vec<Vec<ChunkRef>>> {
    let maps = files
        .iter()
        .map(|(_, path, _)| map_file(path))
        .collect::<Result<Vec<_>>>()?;
    let tasks: Vec<(usize, std::ops::Range<u64>)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, (_, _, size))| chunk_ranges(*size, chunk_size).map(move |r| (i, r)))
        .collect();
    let ids: Vec<ChunkRef> = tasks
        .par_iter()
        .map(|(i, range)| {
            let bytes = match &maps[*i] {
                Some(map) => map
                    .get(range.start as usize..range.end as usize)
                    .unwrap_or_default(),
                None => &[][..],
            };
            ChunkRef {
                id: ChunkId::of(bytes),
                // `chunk_ranges` yields `start <= end`: never saturates.
                len: range.end.saturating_sub(range.start),
            }
        })
        .collect();
    let mut out: Vec<Vec<ChunkRef>> = files.iter().map(|_| Vec::new()).collect();
    for ((i, _), chunk) in tasks.iter().zip(ids) {
        out[*i].push(chunk);
    }
    Ok(out)
}

/// A chunk whose bytes in a file do not match the manifest.
#[derive(Clone, Debug)]
pub struct BadChunk {
    /// Index of the file in the manifest.
    pub file_index: usize,
    /// Offset of the chunk in the file.
    pub offset: u64,
    /// The chunk as the manifest names it.
    pub chunk: ChunkRef,
    /// Whether the bytes were absent (file missing or short) rather than wrong.
    pub missing: bool,
}

/// Re-hashes a shard's files (`paths[i]` holds `manifest.files[i]`) and
/// returns the chunks that do not match. `progress` is called with the bytes
/// checked so far, from rayon's threads.
pub fn find_bad_chunks(
    manifest: &Manifest,
    paths: &[PathBuf],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<BadChunk>> {
    let mut bad = Vec::new();
    let indexed: Vec<usize> = (0..manifest.files.len().min(paths.len())).collect();
    for batch in indexed.chunks(FILES_MAPPED_AT_ONCE) {
        let mut maps = HashMap::with_capacity(batch.len());
        for &i in batch {
            let (file, path) = (&manifest.files[i], &paths[i]);
            let map = match std::fs::metadata(path) {
                Ok(meta) if meta.len() == file.size => map_file(path)?,
                _ => None, // missing or resized: every chunk counts as missing
            };
            maps.insert(i, map);
        }
        let tasks: Vec<(usize, u64, ChunkRef)> = batch
            .iter()
            .flat_map(|&i| {
                manifest.files[i]
                    .chunks_with_offsets()
                    .map(move |(o, c)| (i, o, *c))
            })
            .collect();
        bad.par_extend(tasks.par_iter().filter_map(|&(file_index, offset, chunk)| {
            let bytes = maps
                .get(&file_index)
                .and_then(|m| m.as_ref())
                .and_then(|map| {
                    map.get(offset as usize..offset.saturating_add(chunk.len) as usize)
                });
            let result = match bytes {
                Some(bytes) => (ChunkId::of(bytes) != chunk.id).then_some(false),
                None => Some(true),
            };
            progress(chunk.len);
            result.map(|missing| BadChunk {
                file_index,
                offset,
                chunk,
                missing,
            })
        }));
    }
    Ok(bad)
}
