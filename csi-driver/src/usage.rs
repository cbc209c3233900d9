//! How much a volume uses: NodeGetVolumeStats's answer.
//!
//! A Cairn volume is a directory on the node's memory-tier tmpfs, not a
//! filesystem of its own, so "used" is what its directory tree holds
//! (allocated blocks, like `du`, since tmpfs pages are what it costs) and
//! "available" is what the tmpfs has left. The walk never follows symbolic
//! links and never crosses into another filesystem.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A volume's usage in bytes and inodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes allocated to the directory tree.
    pub bytes_used: u64,
    /// Bytes the filesystem can still give an unprivileged writer.
    pub bytes_available: u64,
    /// Files and directories in the tree, the root included.
    pub inodes_used: u64,
    /// Inodes the filesystem can still give an unprivileged writer.
    pub inodes_available: u64,
}

/// Walks `dir` and asks its filesystem for the free space.
pub fn measure(dir: &Path) -> std::io::Result<Usage> {
    let root = std::fs::symlink_metadata(dir)?;
    let device = root.dev();
    let mut usage = Usage::default();
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    usage.bytes_used += root.blocks() * 512;
    usage.inodes_used += 1;
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            // Files can vanish while the pod writes; skip them.
            let Ok(meta) = entry.metadata() else { continue };
            usage.bytes_used += meta.blocks() * 512;
            usage.inodes_used += 1;
            if meta.is_dir() && meta.dev() == device {
                pending.push(entry.path());
            }
        }
    }
    let fs = rustix::fs::statvfs(dir)?;
    usage.bytes_available = fs.f_bavail.saturating_mul(fs.f_frsize);
    usage.inodes_available = fs.f_favail;
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_and_directories() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = measure(dir.path()).expect("measure");
        assert_eq!(empty.inodes_used, 1);
        std::fs::create_dir(dir.path().join("step-1")).expect("mkdir");
        std::fs::write(dir.path().join("step-1/shard.bin"), vec![7u8; 256 * 1024]).expect("write");
        std::os::unix::fs::symlink("/", dir.path().join("escape")).expect("symlink");
        let used = measure(dir.path()).expect("measure");
        assert_eq!(used.inodes_used, 4);
        assert!(used.bytes_used >= 256 * 1024, "{used:?}");
        assert!(used.bytes_available > 0);
        assert!(used.inodes_available > 0 || used.bytes_available > 0);
    }
}
