//! Small filesystem helpers shared by the tiers: durable writes and sizes.
//!
//! Durability follows one recipe everywhere: write a temporary file, fsync
//! it, rename it into place, fsync the directory. A crash at any point leaves
//! either the old state or the new one, plus a temporary file that the
//! startup scan removes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{IoContext, Result};

/// Writes `data` to `path` atomically and durably (when `sync` is set), via
/// `tmp` on the same filesystem.
pub fn write_atomic(path: &Path, tmp: &Path, data: &[u8], sync: bool) -> Result<()> {
    create_parent(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .io_context(|| format!("creating {}", tmp.display()))?;
    let written = file
        .write_all(data)
        .io_context(|| format!("writing {}", tmp.display()));
    finish_tmp(file, written, tmp, path, sync)
}

/// Creates the directory `path` goes into.
fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).io_context(|| format!("creating {}", parent.display()))
}

/// Ends a write of `file`, open at `tmp`, whose outcome is `written`: fsync
/// (with `sync`), rename onto `path`, fsync the directory. On any failure
/// the temporary file is removed: a full disk fails here, and a file left
/// behind would fill it further until the start-up scan after a restart.
fn finish_tmp(file: File, written: Result<()>, tmp: &Path, path: &Path, sync: bool) -> Result<()> {
    let renamed = written
        .and_then(|()| {
            if sync {
                file.sync_all()
                    .io_context(|| format!("syncing {}", tmp.display()))?;
            }
            Ok(())
        })
        .and_then(|()| {
            fs::rename(tmp, path)
                .io_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    drop(file);
    if let Err(e) = renamed {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    if sync {
        sync_dir(path.parent().unwrap_or(Path::new("/")))?;
    }
    Ok(())
}

/// The alignment `O_DIRECT` asks of a write's buffer, offset and length on
/// the filesystems Cairn's disk tier runs on (4 KiB logical blocks or less).
const DIRECT_ALIGN: usize = 4096;

/// Aligned buffers kept for the next [`write_chunk_file`] so their pages
/// are not faulted in again; one per write in flight, at most
/// [`IDLE_DIRECT_BUFFERS`] kept while none is.
static DIRECT_BUFFERS: Mutex<Vec<memmap2::MmapMut>> = Mutex::new(Vec::new());

/// Idle aligned buffers kept: as many as the writes a node runs at once by
/// default (write-back and replica receives), each a chunk's size.
const IDLE_DIRECT_BUFFERS: usize = 8;

/// An aligned buffer of at least `len` bytes, from the idle ones or new.
fn take_direct_buffer(len: usize) -> std::io::Result<memmap2::MmapMut> {
    let idle = DIRECT_BUFFERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop();
    match idle {
        Some(buffer) if buffer.len() >= len => Ok(buffer),
        _ => memmap2::MmapMut::map_anon(len.max(DIRECT_ALIGN)),
    }
}

/// Keeps `buffer` for a later write, unless enough are idle already.
fn return_direct_buffer(buffer: memmap2::MmapMut) {
    let mut idle = DIRECT_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < IDLE_DIRECT_BUFFERS {
        idle.push(buffer);
    }
}

/// [`write_atomic`] for a chunk file, written with `O_DIRECT`: the bytes go
/// from an aligned buffer to the device without being copied into the page
/// cache, which on a disk costs more CPU than anything else a write-back or
/// a replica receive does (about 1.4 CPU-seconds per 512 MiB here, against
/// 0.1 direct; `benches/results/peer-bench-2026-12-06.md`). The length is
/// padded to the block size for the write and the file cut back to `data`'s
/// length before the rename. A filesystem without `O_DIRECT` (tmpfs), or one
/// that refuses the alignment, gets the buffered [`write_atomic`].
pub fn write_chunk_file(path: &Path, tmp: &Path, data: &[u8], sync: bool) -> Result<()> {
    match write_direct(path, tmp, data, sync) {
        Ok(true) => Ok(()),
        Ok(false) => write_atomic(path, tmp, data, sync),
        Err(e) => Err(e),
    }
}

/// The direct write; `Ok(false)` when the filesystem does not take it (the
/// temporary file is gone again then).
fn write_direct(path: &Path, tmp: &Path, data: &[u8], sync: bool) -> Result<bool> {
    create_parent(path)?;
    // tmpfs takes O_DIRECT (Linux 6.6 and later) and copies into its pages
    // all the same: the aligned buffer would only add a copy.
    if is_tmpfs(path.parent().unwrap_or(Path::new("/"))) {
        return Ok(false);
    }
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(tmp)
    {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
        Err(e) => return Err(e).io_context(|| format!("creating {}", tmp.display())),
    };
    let padded = data
        .len()
        .div_ceil(DIRECT_ALIGN)
        .saturating_mul(DIRECT_ALIGN);
    let written = take_direct_buffer(padded).and_then(|mut buffer| {
        let (bytes, padding) = buffer[..padded].split_at_mut(data.len());
        bytes.copy_from_slice(data);
        padding.fill(0);
        let written = file.write_all(&buffer[..padded]);
        return_direct_buffer(buffer);
        written
    });
    let written = match written {
        Ok(()) => file.set_len(data.len() as u64),
        // Alignment refused (a device with larger blocks): buffered instead.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            drop(file);
            let _ = fs::remove_file(tmp);
            return Ok(false);
        }
        Err(e) => Err(e),
    }
    .io_context(|| format!("writing {}", tmp.display()));
    finish_tmp(file, written, tmp, path, sync).map(|()| true)
}

/// Whether `dir` is on tmpfs (false when that cannot be told).
fn is_tmpfs(dir: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // `f_type` is a C long on some targets and an int on others.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(dir).is_ok_and(|fs| fs.f_type as i64 == TMPFS_MAGIC)
}

/// Flushes everything written to the filesystem holding `dir` (data and
/// renames): one call that makes a batch of unsynced writes durable, instead
/// of an fsync per file.
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    let handle = File::open(dir).io_context(|| format!("opening {}", dir.display()))?;
    rustix::fs::syncfs(&handle)
        .map_err(std::io::Error::from)
        .io_context(|| format!("syncing the filesystem of {}", dir.display()))
}

/// Fsyncs a directory so that renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .io_context(|| format!("syncing directory {}", dir.display()))
}

/// Removes a file or directory tree if it exists.
pub fn remove_all(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.io_context(|| format!("removing {}", path.display()))
}

/// Removes empty directories from `dir` up to (not including) `stop`.
pub fn prune_empty_dirs(mut dir: &Path, stop: &Path) {
    while dir != stop && dir.starts_with(stop) {
        if fs::remove_dir(dir).is_err() {
            break;
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => break,
        }
    }
}

/// Total size in bytes of the filesystem holding `path`.
#[allow(unsafe_code)]
pub fn filesystem_size(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to
    // writable memory of the right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    // Saturating: the counts come from the kernel for any filesystem.
    Some(stat.f_blocks.saturating_mul(stat.f_frsize))
}

/// Takes an exclusive lock on `dir/.lock`, so that two daemons never share a
/// tier directory. The lock lasts as long as the returned file is open.
pub fn lock_dir(dir: &Path) -> Result<File> {
    fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .io_context(|| format!("opening {}", path.display()))?;
    file.try_lock().map_err(|_| {
        crate::error::Error::FailedPrecondition(format!(
            "{} is in use by another cairnd (lock {} is held)",
            dir.display(),
            path.display()
        ))
    })?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths around the block size, the empty file and a chunk, written
    /// directly (a disk-backed temp dir) and buffered (tmpfs): the file holds
    /// exactly the bytes, no padding, and no temporary file is left.
    #[test]
    fn chunk_files_hold_exactly_their_bytes_direct_or_buffered() {
        let on_disk = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
        let on_tmpfs = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        assert!(is_tmpfs(on_tmpfs.path()));
        assert!(!is_tmpfs(Path::new("/proc")));
        for dir in [on_disk.path(), on_tmpfs.path()] {
            for (i, len) in [0, 1, 4095, 4096, 4097, 1 << 20, (4 << 20) + 123]
                .into_iter()
                .enumerate()
            {
                let data: Vec<u8> = (0..len).map(|b| (b % 251) as u8).collect();
                let path = dir.join(format!("chunks/{i}"));
                let tmp = dir.join(format!("tmp-{i}"));
                write_chunk_file(&path, &tmp, &data, i % 2 == 0).expect("written");
                assert_eq!(fs::read(&path).expect("read back"), data, "length {len}");
                assert!(!tmp.exists());
            }
        }
    }
}
