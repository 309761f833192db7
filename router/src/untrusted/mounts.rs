//! The FUSE file systems a process sees. A FUSE daemon answers every request on its files, and
//! one that never answers leaves the asking thread in an uninterruptible wait that not even
//! SIGKILL ends: the router never sends a FUSE file system a request (no open, no `stat`, no
//! read). Which files live on one is told from the process's mount table, which the kernel
//! writes without asking any daemon.

use std::{
    fs::File,
    io::{self, Read},
};

use super::open::Root;

/// Bytes of a mount table read at most (a host with thousands of mounts writes a few MB).
const MOUNTINFO_BUDGET: u64 = 8 << 20;

/// The FUSE mounts of a mount namespace, as a process there sees them.
#[derive(Debug, Default)]
pub struct FuseMounts {
    /// Their devices, `major << 32 | minor` as /proc/PID/maps writes them.
    devices: Vec<u64>,
    /// Their mount points, relative to the process's root.
    points: Vec<String>,
}

impl FuseMounts {
    /// The FUSE mounts that `root`'s process sees (from /proc/PID/mountinfo).
    pub fn of(root: Root) -> io::Result<Self> {
        let path = match root {
            Root::Process(pid) => format!("/proc/{pid}/mountinfo"),
            Root::Host => "/proc/self/mountinfo".to_owned(),
        };
        let mut text = String::new();
        File::open(path)?
            .take(MOUNTINFO_BUDGET)
            .read_to_string(&mut text)?;
        Ok(Self::parse(&text))
    }

    /// The FUSE mounts of a mountinfo text.
    ///
    /// ```
    /// use router::untrusted::mounts::FuseMounts;
    /// let fuse = FuseMounts::parse(
    ///     "22 1 0:21 / /proc rw - proc proc rw\n\
    ///      91 22 0:52 / /home/u/my\\040files rw,nosuid - fuse.sshfs u@h: rw\n",
    /// );
    /// assert!(fuse.holds_device(52));
    /// assert!(fuse.holds_path("/home/u/my files/lib.so"));
    /// assert!(!fuse.holds_path("/home/u/my filesx"));
    /// assert!(!fuse.holds_path("/proc/1/maps"));
    /// ```
    pub fn parse(text: &str) -> Self {
        let mut mounts = Self::default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(separator) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let is_fuse = fields
                .get(separator + 1)
                .is_some_and(|kind| *kind == "fuse" || kind.starts_with("fuse."));
            let is_fuseblk = fields.get(separator + 1) == Some(&"fuseblk");
            if !(is_fuse || is_fuseblk) || fields.len() < 5 {
                continue;
            }
            if let Some((major, minor)) = fields[2].split_once(':') {
                if let (Ok(major), Ok(minor)) = (major.parse::<u64>(), minor.parse::<u64>()) {
                    mounts.devices.push(major << 32 | minor);
                }
            }
            mounts.points.push(unescape(fields[4]));
        }
        mounts
    }

    /// Whether the device `dev` (`major << 32 | minor`) is a FUSE file system's.
    pub fn holds_device(&self, dev: u64) -> bool {
        self.devices.contains(&dev)
    }

    /// Whether the literal path `path` (no symlinks in it: see [`normalize`]) lies on a FUSE
    /// file system.
    pub fn holds_path(&self, path: &str) -> bool {
        self.points.iter().any(|point| {
            let point = point.trim_end_matches('/');
            point.is_empty()
                || path == point
                || path
                    .strip_prefix(point)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// `path` made absolute and without `.`, `..` or repeated slashes, lexically (right for a
/// path that holds no symlink), joined to `base` when relative; `..` stops at the root.
pub fn normalize(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let start = if path.starts_with('/') { "" } else { base };
    for part in start.split('/').chain(path.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_within_the_root() {
        assert_eq!(
            normalize("/usr/lib/debug/.build-id/ab", "../../x.debug"),
            "/usr/lib/debug/x.debug"
        );
        assert_eq!(normalize("/a", "/../../etc//passwd"), "/etc/passwd");
        assert_eq!(normalize("/a/b", "./c/../d"), "/a/b/d");
    }

    #[test]
    fn fuseblk_and_a_root_mounted_fuse_are_found() {
        let fuse = FuseMounts::parse("1 0 8:1 / / rw - fuseblk /dev/sda1 rw\n");
        assert!(fuse.holds_path("/anything"));
        assert!(fuse.holds_device(8 << 32 | 1));
    }
}
