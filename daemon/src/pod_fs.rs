//! Filesystem work inside directories a pod controls (its CSI volume's
//! `data/`), done so that nothing the pod puts there can redirect it.
//!
//! The pod can rename, replace or link anything in its volume at any
//! moment, so paths are never resolved twice: every step goes from an open
//! directory descriptor to the next with `openat(..., O_NOFOLLOW)`, entries
//! are checked with `fstat` on the descriptor that was opened, files are
//! linked through their descriptors (`/proc/self/fd/N`), and removal never
//! descends through a link. A link where a directory should be is removed
//! (in cairnd's own `.cairn/` tree) or refuses the operation (in the pod's
//! files); it is never followed.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::RDONLY);

/// Most directory levels removed by [`remove_tree_at`]; deeper trees are
/// left (a shard's file names are at most `MAX_FILE_DEPTH` deep).
const MAX_REMOVE_DEPTH: usize = 64;

fn io(context: impl Into<String>) -> impl FnOnce(Errno) -> Error {
    let context = context.into();
    move |errno| Error::Io {
        context,
        source: errno.into(),
    }
}

/// Opens `path` as a directory without following a link at its last
/// component (its parents are cairnd's own directories).
pub fn open_dir(path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(path, DIR_FLAGS, Mode::empty())
        .map_err(io(format!("opening {}", path.display())))
}

/// Opens (creating it with `mode`, owned by cairnd) the directory `name` in
/// `parent`. Something else there (a link, a file) is removed first: this is
/// for cairnd's own directories inside a volume, which the pod has no
/// business replacing. The mode is set through the descriptor.
pub fn own_dir_at(parent: BorrowedFd<'_>, name: &str, mode: u32, shown: &Path) -> Result<OwnedFd> {
    for _ in 0..2 {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io(format!("creating {}", shown.display()))(e)),
        }
        match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
            Ok(dir) => {
                rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode))
                    .map_err(io(format!("setting the mode of {}", shown.display())))?;
                return Ok(dir);
            }
            Err(Errno::LOOP | Errno::NOTDIR) => {
                tracing::warn!(path = %shown.display(), "replacing what the pod put where cairnd's directory goes");
                rustix::fs::unlinkat(parent, name, AtFlags::empty())
                    .map_err(io(format!("removing {}", shown.display())))?;
            }
            Err(e) => return Err(io(format!("opening {}", shown.display()))(e)),
        }
    }
    Err(Error::FailedPrecondition(format!(
        "{} keeps being replaced",
        shown.display()
    )))
}

/// Opens the existing directory `name` in `parent`, refusing a link.
pub fn dir_at(parent: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<OwnedFd> {
    rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(|errno| match errno {
        Errno::LOOP | Errno::NOTDIR => Error::FailedPrecondition(format!(
            "{} is not a directory (a link put in its place?)",
            shown.display()
        )),
        errno => io(format!("opening {}", shown.display()))(errno),
    })
}

/// Creates the directories of `relative` (a shard file name: `/`-separated,
/// validated) below `root`, except its last component; returns the
/// innermost directory and the last component.
pub fn parent_dirs_at<'a>(
    root: BorrowedFd<'_>,
    relative: &'a str,
    mode: u32,
    shown: &Path,
) -> Result<(OwnedFd, &'a str)> {
    let (dirs, last) = match relative.rsplit_once('/') {
        Some((dirs, last)) => (Some(dirs), last),
        None => (None, relative),
    };
    let mut dir =
        rustix::io::fcntl_dupfd_cloexec(root, 0).map_err(io("duplicating a descriptor"))?;
    if let Some(dirs) = dirs {
        for component in dirs.split('/') {
            dir = own_dir_at(dir.as_fd(), component, mode, &shown.join(component))?;
        }
    }
    Ok((dir, last))
}

/// The device and inode of an open file.
pub fn identity(fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
    let stat = rustix::fs::fstat(fd).map_err(io("inspecting a staged file"))?;
    Ok((stat.st_dev, stat.st_ino))
}

/// Opens the entry `name` of `dir` without following it (`O_PATH`), and
/// says what it is.
pub fn entry_at(
    dir: BorrowedFd<'_>,
    name: &str,
) -> std::result::Result<(OwnedFd, FileType, rustix::fs::Stat), Errno> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    Ok((fd, FileType::from_raw_mode(stat.st_mode), stat))
}

/// The path through which the inode behind `fd` itself is reached
/// (`/proc/self/fd/N`): linking or changing the mode through it acts on
/// that inode, whatever its names are now.
pub fn fd_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never holds a NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Hard-links the inode behind `fd` as `name` in `dir`.
pub fn link_fd_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<()> {
    rustix::fs::linkat(
        rustix::fs::CWD,
        fd_path(fd).as_c_str(),
        dir,
        name,
        AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(io(format!("linking {}", shown.display())))
}

/// Sets the mode of the inode behind `fd` (an `O_PATH` one will do).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32, shown: &Path) -> Result<()> {
    rustix::fs::chmod(fd_path(fd).as_c_str(), Mode::from_raw_mode(mode))
        .map_err(io(format!("setting the mode of {}", shown.display())))
}

/// Removes `name` in `dir` and, if it is a directory, everything below it,
/// never following a link (a link is removed as itself). Missing is fine.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &str) -> Result<()> {
    remove_tree_depth(dir, name, 0)
}

fn remove_tree_depth(dir: BorrowedFd<'_>, name: &str, depth: usize) -> Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(e) => return Err(io(format!("removing {name}"))(e)),
    }
    if depth >= MAX_REMOVE_DEPTH {
        return Err(Error::FailedPrecondition(format!(
            "{name} is nested deeper than {MAX_REMOVE_DEPTH} levels; left in place"
        )));
    }
    let sub = match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(sub) => sub,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io(format!("opening {name}"))(e)),
    };
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&sub).map_err(io(format!("listing {name}")))? {
        let entry = entry.map_err(io(format!("listing {name}")))?;
        let child = entry.file_name().to_bytes();
        if child != b"." && child != b".." {
            names.push(String::from_utf8_lossy(child).into_owned());
        }
    }
    for child in names {
        remove_tree_depth(sub.as_fd(), &child, depth.saturating_add(1))?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(io(format!("removing {name}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn removal_never_descends_through_a_link_and_own_dirs_replace_links() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        std::fs::write(outside.join("keep"), b"x").expect("keep");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).expect("tree");
        std::fs::write(tree.join("a/b/f"), b"x").expect("f");
        symlink(&outside, tree.join("a/link")).expect("link");
        let root = open_dir(dir.path()).expect("open");
        remove_tree_at(root.as_fd(), "tree").expect("remove");
        assert!(!tree.exists());
        assert!(outside.join("keep").exists(), "removal followed a link");

        symlink(&outside, dir.path().join("own")).expect("planted link");
        let own = own_dir_at(root.as_fd(), "own", 0o755, &dir.path().join("own")).expect("own");
        assert!(
            std::fs::symlink_metadata(dir.path().join("own"))
                .expect("stat")
                .is_dir()
        );
        let (sub, last) = parent_dirs_at(own.as_fd(), "x/y/file", 0o755, dir.path()).expect("dirs");
        assert_eq!(last, "file");
        drop(sub);
        assert!(dir.path().join("own/x/y").is_dir());
        assert!(std::fs::read_dir(&outside).expect("outside").count() == 1);
        assert!(dir_at(root.as_fd(), "outside", &outside).is_ok());
        symlink(&outside, dir.path().join("l2")).expect("l2");
        assert!(matches!(
            dir_at(root.as_fd(), "l2", dir.path()),
            Err(Error::FailedPrecondition(_))
        ));
    }
}
