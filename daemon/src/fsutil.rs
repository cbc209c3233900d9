//! Small filesystem helpers shared by the tiers: durable writes and sizes.
//!
//! Durability follows one recipe everywhere: write a temporary file, fsync
//! it, rename it into place, fsync the directory. A crash at any point leaves
//! either the old state or the new one, plus a temporary file that the
//! startup scan removes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use cairn_core::chunk::MAX_CHUNK_SIZE;

use crate::error::{Error, IoContext, Result};

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

/// Aligned buffers kept for the next [`write_chunk_file`] or
/// [`read_chunk_file`] so their pages are not faulted in again; one per
/// read or write in flight, at most [`IDLE_DIRECT_BYTES`] kept while none
/// is.
static DIRECT_BUFFERS: Mutex<Vec<memmap2::MmapMut>> = Mutex::new(Vec::new());

/// Bytes of idle aligned buffers kept: sixteen 4 MiB chunks, about what a
/// node reads and writes at once by default (write-back, replica receives,
/// chunks served to a restoring peer). A budget in bytes rather than a
/// count, so that a job with 256 MiB chunks does not leave gigabytes idle.
const IDLE_DIRECT_BYTES: usize = 64 << 20;

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

/// Keeps `buffer` for a later read or write, unless the idle ones would
/// then hold more than [`IDLE_DIRECT_BYTES`].
fn return_direct_buffer(buffer: memmap2::MmapMut) {
    let mut idle = DIRECT_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let held = idle
        .iter()
        .fold(buffer.len(), |sum, b| sum.saturating_add(b.len()));
    if held <= IDLE_DIRECT_BYTES {
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

/// Reads the chunk file at `path`: its first `len` bytes, or all of it when
/// `len` is `None` (at most [`MAX_CHUNK_SIZE`]: a larger file is no chunk
/// and is refused before anything is allocated). `Ok(None)` when the file
/// is missing or shorter than `len`.
///
/// Read with `O_DIRECT` where the filesystem takes it: the device writes
/// straight into an aligned buffer from the pool, which goes back to the
/// pool when the last `Bytes` of it is dropped. A buffered read costs a copy
/// out of the page cache and the cache's bookkeeping for every page: on this
/// project's test machine 0.19 to 0.26 CPU-seconds per GiB against 0.05
/// direct, and a fifth of a peer's CPU while it serves a restore from its
/// replicas (`benches/results/peer-bench-2026-12-06.md`). Chunk files are
/// written once and read when a restore or a peer needs them, so the page
/// cache rarely has them anyway. tmpfs, or a filesystem that refuses
/// `O_DIRECT`, gets a buffered read.
pub fn read_chunk_file(path: &Path, len: Option<u64>) -> Result<Option<Bytes>> {
    if !is_tmpfs(path.parent().unwrap_or(Path::new("/")))
        && let DirectRead::Done(read) = read_chunk_file_direct(path, len)?
    {
        return Ok(read);
    }
    let Some(file) = open_chunk_file(path, false)? else {
        return Ok(None);
    };
    let Some(wanted) = chunk_file_length(&file, path, len)? else {
        return Ok(None);
    };
    read_to_len(file, wanted, path)
}

/// The next `len` bytes of `file` (open at `path`), through the page cache;
/// `None` when it ends sooner. Reads into the vector's spare capacity, so
/// the buffer is never zeroed first.
pub fn read_to_len(file: File, len: usize, path: &Path) -> Result<Option<Bytes>> {
    let mut buf = Vec::with_capacity(len);
    file.take(len as u64)
        .read_to_end(&mut buf)
        .io_context(|| format!("reading {}", path.display()))?;
    Ok((buf.len() == len).then(|| Bytes::from(buf)))
}

/// What [`read_chunk_file_direct`] did.
enum DirectRead {
    /// Read: [`read_chunk_file`]'s answer.
    Done(Option<Bytes>),
    /// The filesystem refused `O_DIRECT` (the flag, or the alignment on a
    /// device with larger blocks): read it buffered instead.
    Refused,
}

/// [`read_chunk_file`] with `O_DIRECT`.
fn read_chunk_file_direct(path: &Path, len: Option<u64>) -> Result<DirectRead> {
    let refused = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
    let file = match open_chunk_file(path, true) {
        Ok(Some(file)) => file,
        Ok(None) => return Ok(DirectRead::Done(None)),
        Err(Error::Io { source, .. }) if refused(&source) => return Ok(DirectRead::Refused),
        Err(e) => return Err(e),
    };
    let Some(wanted) = chunk_file_length(&file, path, len)? else {
        return Ok(DirectRead::Done(None));
    };
    match read_direct(&file, wanted) {
        Ok(read) => Ok(DirectRead::Done(read)),
        Err(e) if refused(&e) => Ok(DirectRead::Refused),
        Err(e) => Err(e).io_context(|| format!("reading {}", path.display())),
    }
}

/// `path` opened for reading, with `O_DIRECT` when `direct`; `None` when
/// it does not exist.
pub fn open_chunk_file(path: &Path, direct: bool) -> Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).io_context(|| format!("opening {}", path.display())),
    }
}

/// How many bytes [`read_chunk_file`] reads from `file`: `len`, or the
/// whole file when `len` is `None`; `None` when the file is shorter than
/// `len`. Larger than any chunk is refused.
fn chunk_file_length(file: &File, path: &Path, len: Option<u64>) -> Result<Option<usize>> {
    let size = file
        .metadata()
        .io_context(|| format!("reading the size of {}", path.display()))?
        .len();
    let wanted = match len {
        Some(len) if size < len => return Ok(None),
        Some(len) => len,
        None => size,
    };
    if wanted > MAX_CHUNK_SIZE {
        return Err(Error::DataLoss(format!(
            "{} holds {wanted} bytes, more than a chunk can ({MAX_CHUNK_SIZE})",
            path.display()
        )));
    }
    usize::try_from(wanted)
        .map(Some)
        .map_err(|_| Error::InvalidArgument(format!("{wanted} bytes do not fit in memory")))
}

/// The first `len` bytes of `file`, opened with `O_DIRECT`, in a pooled
/// aligned buffer; `None` when the file ends sooner.
fn read_direct(mut file: &File, len: usize) -> std::io::Result<Option<Bytes>> {
    let padded = len.div_ceil(DIRECT_ALIGN).saturating_mul(DIRECT_ALIGN);
    let mut buffer = take_direct_buffer(padded)?;
    let mut filled = 0;
    while filled < len {
        match file.read(&mut buffer[filled..padded]) {
            Ok(0) => break,
            // A read returns at most what it was given room for.
            Ok(n) => filled = filled.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return_direct_buffer(buffer);
                return Err(e);
            }
        }
    }
    if filled < len {
        return_direct_buffer(buffer);
        return Ok(None);
    }
    Ok(Some(Bytes::from_owner(PooledRead {
        buffer: Some(buffer),
        len,
    })))
}

/// The bytes of a [`read_direct`]: its buffer goes back to the pool when
/// the last `Bytes` of it is dropped.
struct PooledRead {
    buffer: Option<memmap2::MmapMut>,
    len: usize,
}

impl AsRef<[u8]> for PooledRead {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_deref().map_or(&[], |b| &b[..self.len])
    }
}

impl Drop for PooledRead {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            return_direct_buffer(buffer);
        }
    }
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

    /// What `read_chunk_file` gives back, direct (a disk-backed temp dir)
    /// and buffered (tmpfs): exactly the bytes asked for, the whole file
    /// when no length is given, `None` for a missing or short file, and an
    /// error naming the file for one larger than any chunk.
    #[test]
    fn chunk_files_read_back_exactly_direct_or_buffered() {
        let on_disk = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
        let on_tmpfs = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        for dir in [on_disk.path(), on_tmpfs.path()] {
            for len in [0usize, 1, 4095, 4096, 4097, 1 << 20, (4 << 20) + 123] {
                let data: Vec<u8> = (0..len).map(|b| (b % 251) as u8).collect();
                let path = dir.join(format!("chunk-{len}"));
                fs::write(&path, &data).expect("written");
                let read = |len: Option<usize>| {
                    read_chunk_file(&path, len.map(|l| l as u64)).expect("read")
                };
                assert_eq!(read(None).as_deref(), Some(&data[..]), "whole, {len}");
                assert_eq!(read(Some(len)).as_deref(), Some(&data[..]), "{len}");
                assert_eq!(read(Some(len + 1)), None, "past the end of {len}");
                if let Some(shorter) = len.checked_sub(1) {
                    assert_eq!(read(Some(shorter)).as_deref(), Some(&data[..shorter]));
                }
                // Many reads held at once: each its own buffer.
                let held: Vec<Bytes> = (0..20).filter_map(|_| read(None)).collect();
                assert!(held.iter().all(|b| b[..] == data[..]), "held, {len}");
            }
            assert_eq!(
                read_chunk_file(&dir.join("missing"), None).expect("read"),
                None
            );
            let huge = dir.join("huge");
            File::create(&huge)
                .and_then(|f| f.set_len(MAX_CHUNK_SIZE + 1))
                .expect("sparse file");
            let error = read_chunk_file(&huge, None).expect_err("larger than a chunk");
            assert!(matches!(error, Error::DataLoss(_)), "{error}");
            assert!(error.to_string().contains("huge"), "{error}");
        }
    }
}
