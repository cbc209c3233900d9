//! inotify on tokio: directory watches and their events, as owned values.
//!
//! A thin wrapper over rustix's safe inotify calls (already a dependency of
//! the workspace) with the descriptor registered in tokio's reactor, so
//! waiting for events costs no thread. The descriptor is non-blocking: a
//! read drains what the kernel has queued and stops at `EAGAIN`.

use std::ffi::OsString;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::unix::AsyncFd;

/// Bytes read from the descriptor at once: room for a few hundred events.
const READ_BUFFER: usize = 16 * 1024;

/// One inotify event.
#[derive(Debug)]
pub(super) struct Event {
    /// The watch it belongs to (`-1` for a queue overflow).
    pub wd: i32,
    /// What happened.
    pub mask: ReadFlags,
    /// The entry it happened to, inside the watched directory.
    pub name: Option<OsString>,
}

/// An inotify instance.
pub(super) struct Inotify {
    fd: AsyncFd<OwnedFd>,
}

impl Inotify {
    /// A new, non-blocking instance registered with the current runtime.
    pub fn new() -> std::io::Result<Self> {
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        // `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` may
        // close or swap its descriptor while registered; its replacement is
        // `unsafe`, which this workspace denies. An `OwnedFd` owned by the
        // `AsyncFd` upholds that contract by construction: it always returns
        // the same open descriptor until the `AsyncFd` drops it.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        Ok(Self { fd })
    }

    /// Watches `dir` (never through a symbolic link) for `flags`; watching
    /// the same directory again returns the same descriptor.
    pub fn add(&self, dir: &Path, flags: WatchFlags) -> std::io::Result<i32> {
        Ok(inotify::add_watch(
            self.fd.get_ref(),
            dir,
            flags | WatchFlags::ONLYDIR | WatchFlags::DONT_FOLLOW,
        )?)
    }

    /// Waits for events and returns every one queued.
    pub async fn next_batch(&self) -> std::io::Result<Vec<Event>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| drain(fd.get_ref())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads every queued event; `WouldBlock` when there was none.
fn drain(fd: &OwnedFd) -> std::io::Result<Vec<Event>> {
    let mut buf = [MaybeUninit::<u8>::uninit(); READ_BUFFER];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    let mut events = Vec::new();
    loop {
        match reader.next() {
            Ok(event) => events.push(Event {
                wd: event.wd(),
                mask: event.events(),
                name: event
                    .file_name()
                    .map(|n| OsString::from_vec(n.to_bytes().to_vec()))
                    .filter(|n| !n.is_empty()),
            }),
            Err(rustix::io::Errno::AGAIN) if !events.is_empty() => return Ok(events),
            Err(errno) => return Err(errno.into()),
        }
    }
}
