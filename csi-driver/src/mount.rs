//! Bind mounts and unmounts, through rustix's safe `mount(2)` wrappers.
//!
//! A read-only bind mount takes two calls: `MS_BIND` ignores `MS_RDONLY`,
//! so the fresh mount is then remounted with `MS_REMOUNT | MS_BIND |
//! MS_RDONLY`. A remount replaces the mount's flags, so the flags the bind
//! inherited from the source mount (`nosuid`, `nodev`, `noexec` on
//! `/dev/shm`) are read back with `statvfs` and kept.

use std::path::{Path, PathBuf};

use rustix::fs::StatVfsMountFlags;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::{Error, IoContext, Result};
use crate::mountinfo::{self, MountEntry};

/// Most mounts stacked on one target that an unmount loop will peel off
/// before giving up: more means something else keeps mounting there.
const MAX_STACKED_MOUNTS: usize = 16;

/// Bind-mounts `source` onto `target`, read-only when asked. On failure
/// nothing stays mounted at `target`.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    rustix::mount::mount_bind(source, target).io_context(|| {
        format!(
            "bind-mounting {} onto {}",
            source.display(),
            target.display()
        )
    })?;
    if read_only && let Err(e) = remount_read_only(target) {
        if let Err(undo) = rustix::mount::unmount(target, UnmountFlags::empty()) {
            tracing::error!(
                target = %target.display(),
                error = %undo,
                "could not undo a bind mount whose read-only remount failed"
            );
        }
        return Err(e);
    }
    Ok(())
}

fn remount_read_only(target: &Path) -> Result<()> {
    let current = rustix::fs::statvfs(target)
        .io_context(|| format!("reading the mount flags of {}", target.display()))?
        .f_flag;
    let mut flags = MountFlags::BIND | MountFlags::RDONLY;
    for (kept, as_mount) in [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ] {
        if current.contains(kept) {
            flags |= as_mount;
        }
    }
    rustix::mount::mount_remount(target, flags, "")
        .io_context(|| format!("remounting {} read-only", target.display()))
}

/// What [`unmount_owned`] did at a target.
#[derive(Debug, Default)]
pub struct Unmounted {
    /// How many mounts it took off.
    pub count: usize,
    /// The root of the mount it found on top and left in place because it
    /// was not the caller's; `None` when the target is no longer a mount
    /// point.
    pub left: Option<PathBuf>,
}

/// Unmounts the mounts stacked on `target`, last first, for as long as
/// `owned` claims the one on top: a mount that is not the caller's (another
/// volume published at the same path) is never taken off, and nothing under
/// it either. A busy mount is an error, not a lazy detach: the CO retries,
/// and the volume's directory is never deleted under a live mount.
pub fn unmount_owned(target: &Path, owned: impl Fn(&MountEntry) -> bool) -> Result<Unmounted> {
    let mut done = Unmounted::default();
    for _ in 0..MAX_STACKED_MOUNTS {
        let entries =
            mountinfo::read().io_context(|| format!("reading {}", mountinfo::MOUNTINFO))?;
        let Some(top) = mountinfo::mounts_at(&entries, target).pop() else {
            return Ok(done);
        };
        if !owned(top) {
            done.left = Some(top.root.clone());
            return Ok(done);
        }
        rustix::mount::unmount(target, UnmountFlags::empty())
            .io_context(|| format!("unmounting {}", target.display()))?;
        done.count += 1;
    }
    Err(Error::FailedPrecondition(format!(
        "{} is still a mount point after {MAX_STACKED_MOUNTS} unmounts",
        target.display()
    )))
}
