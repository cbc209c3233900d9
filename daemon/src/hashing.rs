//! Hashing files in place, in parallel, off the async threads.
//!
//! Commit hashes the files the client wrote directly in tmpfs: each file is
//! memory-mapped (no copy) and its chunks are hashed on rayon's pool, one
//! chunk per task, so hashing scales with cores. Callers run these functions
//! inside `spawn_blocking`.

use std::fs::File;
use std::path::{Path, PathBuf};

use cairn_core::{ChunkId, ChunkRef, ChunkSize, Manifest, chunk_ranges};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};

/// A read-only map of a whole file; `None` for an empty file (which cannot
/// be mapped and has no chunks).
fn map_file(path: &Path) -> Result<Option<(File, Mmap)>> {
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
    Ok(Some((file, map)))
}

/// Hashes each file at `chunk_size`, after checking that it still has the
/// size the client declared. Returns each file's chunk list.
pub fn hash_files(
    files: &[(String, PathBuf, u64)],
    chunk_size: ChunkSize,
) -> Result<Vec<Vec<ChunkRef>>> {
    let mut maps = Vec::with_capacity(files.len());
    for (name, path, declared) in files {
        let actual = std::fs::metadata(path)
            .io_context(|| format!("reading size of {}", path.display()))?
            .len();
        if actual != *declared {
            return Err(Error::InvalidArgument(format!(
                "file {name}: declared {declared} bytes but the file holds {actual}"
            )));
        }
        maps.push(map_file(path)?);
    }
    let tasks: Vec<(usize, std::ops::Range<u64>)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, (_, _, size))| chunk_ranges(*size, chunk_size).map(move |r| (i, r)))
        .collect();
    let ids: Vec<ChunkRef> = tasks
        .par_iter()
        .map(|(i, range)| {
            let bytes = match &maps[*i] {
                Some((_, map)) => &map[range.start as usize..range.end as usize],
                None => &[][..],
            };
            ChunkRef {
                id: ChunkId::of(bytes),
                len: range.end - range.start,
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
    let mut maps = Vec::with_capacity(paths.len());
    for (file, path) in manifest.files.iter().zip(paths) {
        let map = match std::fs::metadata(path) {
            Ok(meta) if meta.len() == file.size => map_file(path)?,
            _ => None, // missing or resized: every chunk counts as missing
        };
        maps.push(map);
    }
    let tasks: Vec<(usize, u64, ChunkRef)> = manifest
        .files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.chunks_with_offsets().map(move |(o, c)| (i, o, *c)))
        .collect();
    let bad = tasks
        .par_iter()
        .filter_map(|&(file_index, offset, chunk)| {
            let result = match &maps[file_index] {
                Some((_, map)) => {
                    let ok = ChunkId::of(&map[offset as usize..(offset + chunk.len) as usize])
                        == chunk.id;
                    (!ok).then_some(false)
                }
                None => Some(true),
            };
            progress(chunk.len);
            result.map(|missing| BadChunk {
                file_index,
                offset,
                chunk,
                missing,
            })
        })
        .collect();
    Ok(bad)
}
