//! Reading `/proc/self/mountinfo`: which paths are mount points.
//!
//! The plugin asks "is the target a mount point?" before mounting (so a
//! repeated publish never stacks a second mount) and while unmounting (until
//! nothing is left). Comparing device numbers of a path and its parent would
//! miss bind mounts from the same filesystem — exactly what this plugin
//! makes — so the kernel's own list is the only reliable answer.
//!
//! Format (proc(5)): `id parent major:minor root mount_point options
//! [optional fields...] - fstype source super_options`, one mount per line.
//! Paths escape space, tab, newline and backslash as three-digit octal
//! (`\040`, `\011`, `\012`, `\134`), and are otherwise raw bytes, so the
//! parser works on bytes, not UTF-8.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's unique id.
    pub mount_id: u64,
    /// The parent mount's id.
    pub parent_id: u64,
    /// The directory of the filesystem that forms this mount's root (for a
    /// bind mount, the source directory relative to its filesystem).
    pub root: PathBuf,
    /// Where it is mounted, relative to this process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub options: String,
    /// The filesystem type (`tmpfs`, `ext4`, ...).
    pub fs_type: String,
    /// The mount source (device, or `tmpfs`, ...).
    pub source: String,
}

impl MountEntry {
    /// Whether the mount is read-only (per mount, not per superblock).
    pub fn is_read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Parses mountinfo text. A malformed line is an error naming its number:
/// guessing about mounts is how a plugin unmounts the wrong thing.
pub fn parse(text: &[u8]) -> std::io::Result<Vec<MountEntry>> {
    text.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(n, line)| {
            parse_line(line).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "malformed mountinfo line {}: {}",
                        n + 1,
                        String::from_utf8_lossy(line)
                    ),
                )
            })
        })
        .collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let separator = fields.iter().position(|f| *f == b"-")?;
    if separator < 6 || fields.len() < separator + 3 {
        return None;
    }
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u64>().ok();
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    let path = |f: &[u8]| PathBuf::from(OsString::from_vec(unescape(f)));
    Some(MountEntry {
        mount_id: number(fields[0])?,
        parent_id: number(fields[1])?,
        root: path(fields[3]),
        mount_point: path(fields[4]),
        options: text(fields[5]),
        fs_type: text(fields[separator + 1]),
        source: text(fields[separator + 2]),
    })
}

/// Undoes the kernel's octal escapes (`\040` is a space). A backslash not
/// followed by three octal digits is kept as it is.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Reads and parses this process's mount table.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    parse(&std::fs::read(MOUNTINFO)?)
}

/// The mounts whose mount point is `path` (stacked mounts give several).
/// `path` is compared as given and, when it exists, after resolving
/// symbolic links, since the kernel lists resolved paths.
pub fn mounts_at<'a>(entries: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    let resolved = std::fs::canonicalize(path).ok();
    entries
        .iter()
        .filter(|e| e.mount_point == path || resolved.as_deref() == Some(e.mount_point.as_path()))
        .collect()
}

/// Whether `path` is a mount point now.
pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    Ok(!mounts_at(&read()?, path).is_empty())
}

/// Every mount point under `dir` (not `dir` itself), deepest first: the
/// order to unmount them in.
pub fn mounts_under(entries: &[MountEntry], dir: &Path) -> Vec<PathBuf> {
    let resolved = std::fs::canonicalize(dir).ok();
    let mut found: Vec<PathBuf> = entries
        .iter()
        .filter(|e| {
            let under = |d: &Path| e.mount_point.starts_with(d) && e.mount_point != d;
            under(dir) || resolved.as_deref().is_some_and(under)
        })
        .map(|e| e.mount_point.clone())
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
26 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
35 26 0:30 / /dev/shm rw,nosuid,nodev shared:9 - tmpfs tmpfs rw,size=65536k
412 26 0:30 /cairn/volumes/csi-1/data /var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/my\\040vol/mount rw,nosuid,nodev shared:9 - tmpfs tmpfs rw
413 412 0:30 /cairn/volumes/csi-1/data /var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/my\\040vol/mount ro,nosuid,nodev shared:9 - tmpfs tmpfs rw
500 26 8:1 /a\\011b\\012c\\134d /mnt/odd rw master:3 propagate_from:2 - ext4 /dev/sda1 rw
";

    #[test]
    fn parses_fields_and_unescapes_paths() {
        let entries = parse(SAMPLE.as_bytes()).expect("parse");
        assert_eq!(entries.len(), 6);
        let bind = &entries[3];
        assert_eq!(bind.mount_id, 412);
        assert_eq!(bind.parent_id, 26);
        assert_eq!(bind.root, Path::new("/cairn/volumes/csi-1/data"));
        assert_eq!(
            bind.mount_point,
            Path::new("/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/my vol/mount")
        );
        assert_eq!(bind.fs_type, "tmpfs");
        assert!(!bind.is_read_only());
        assert!(entries[4].is_read_only());
        // Several optional fields before the separator.
        assert_eq!(entries[5].root, Path::new("/a\tb\nc\\d"));
        assert_eq!(entries[5].source, "/dev/sda1");
    }

    #[test]
    fn counts_stacked_mounts_and_lists_mounts_under_a_directory() {
        let entries = parse(SAMPLE.as_bytes()).expect("parse");
        let target = Path::new("/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/my vol/mount");
        assert_eq!(mounts_at(&entries, target).len(), 2);
        assert!(mounts_at(&entries, Path::new("/var/lib/kubelet")).is_empty());
        let under = mounts_under(&entries, Path::new("/var/lib/kubelet"));
        assert_eq!(under, vec![target.to_path_buf()]);
        assert!(mounts_under(&entries, target).is_empty());
    }

    #[test]
    fn odd_escapes_are_kept_verbatim() {
        assert_eq!(unescape(br"a\040b"), b"a b");
        assert_eq!(unescape(br"a\04"), br"a\04");
        assert_eq!(unescape(br"a\089"), br"a\089");
        assert_eq!(unescape(br"\777"), br"\777");
        assert_eq!(unescape(br"trailing\"), br"trailing\");
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse(b"1 2 3\n").is_err());
        assert!(parse(b"x 1 0:1 / / rw - ext4 /dev/sda rw\n").is_err());
        assert!(parse(b"").expect("empty").is_empty());
    }

    #[test]
    fn reads_the_real_table() {
        let entries = read().expect("read mountinfo");
        assert!(entries.iter().any(|e| e.mount_point == Path::new("/")));
        assert!(is_mount_point(Path::new("/")).expect("root"));
    }
}
