//! Opening a file that another process names, so that the name cannot lead the router out of
//! that process's root, into a file it should not read, or into an open that never returns.
//!
//! A path is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` against the process's root directory (`/proc/PID/root`): `..`
//! stays inside it, and no symlink is followed by the kernel. Where links must be followed
//! (debug files), each is read and resolved inside the root here, so that every path walked is
//! literal and can be checked against the process's FUSE mounts first ([`super::mounts`]).
//! The file is first opened with `O_PATH`, which opens nothing (no FIFO waits for a writer, no
//! device is touched), checked to be a regular file, and only then opened for reading through
//! `/proc/self/fd`, which reaches exactly the inode checked. Every open is `O_CLOEXEC` and
//! `O_NONBLOCK`.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
};

use super::mounts::{normalize, FuseMounts};
use crate::process::MapEntry;

/// Where a path is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// The root directory of process `pid` (its chroot or its mount namespace's root).
    Process(u32),
    /// The router's own root.
    Host,
}

/// Opens `path` as it resolves inside `root`, for reading, if it is a regular file: no
/// component may be a symlink, and none may lie on a FUSE file system.
///
/// # Errors
///
/// The open's error; `InvalidInput` when the path holds a symlink or names anything but a
/// regular file (a FIFO, a device, a directory, a socket); `Unsupported` when it lies on a
/// FUSE file system.
///
/// ```
/// use router::untrusted::open::{open_in, Root};
///
/// let me = Root::Process(std::process::id());
/// assert!(open_in(me, "/proc/self/exe").is_err()); // a magic link
/// let device = open_in(me, "/dev/null").unwrap_err();
/// assert_eq!(device.kind(), std::io::ErrorKind::InvalidInput);
/// ```
pub fn open_in(root: Root, path: &str) -> io::Result<File> {
    open_walk(root, &FuseMounts::of(root)?, path, 0)
}

/// [`open_in`], following up to eight symlinks (each resolved inside `root`, and checked
/// against its FUSE mounts before it is walked), as debug file links need (Fedora's
/// `/usr/lib/debug/.build-id/xx/yyyy.debug` are links to the debug files).
///
/// # Errors
///
/// As [`open_in`]; `InvalidInput` after eight links.
pub fn open_in_following_links(root: Root, path: &str) -> io::Result<File> {
    open_walk(root, &FuseMounts::of(root)?, path, 8)
}

/// Opens `path` inside `root`, whose FUSE mounts are `fuse`, following up to `links` symlinks.
fn open_walk(root: Root, fuse: &FuseMounts, path: &str, links: usize) -> io::Result<File> {
    let root_dir = match root {
        Root::Process(pid) => format!("/proc/{pid}/root"),
        Root::Host => "/".to_owned(),
    };
    let dir = open_path(&root_dir, libc::O_DIRECTORY)?;
    let mut path = normalize("/", path);
    for _ in 0..=links {
        if fuse.holds_path(&path) {
            return Err(on_fuse());
        }
        let fd = openat2_in_root(&dir, &path)?;
        if File::from(fd.try_clone()?)
            .metadata()?
            .file_type()
            .is_symlink()
        {
            let target = read_link(&fd)?;
            let parent = path.rsplit_once('/').map_or("/", |(parent, _)| parent);
            path = normalize(if parent.is_empty() { "/" } else { parent }, &target);
            continue;
        }
        return reopen_regular(fd);
    }
    Err(not_regular("a symlink"))
}

/// An `O_PATH` descriptor of `path` inside `dir`, taken as a root: no symlink is followed
/// (one at the end is opened itself), no magic link either.
fn openat2_in_root(dir: &OwnedFd, path: &str) -> io::Result<OwnedFd> {
    let relative = path.trim_start_matches('/');
    let name = c_path(if relative.is_empty() { "." } else { relative })?;
    // SAFETY: `open_how` is plain integers; zero is a valid value of each.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // `EAGAIN`: a rename raced with the walk; the kernel asks for a retry.
    for _ in 0..8 {
        // SAFETY: openat2 with a valid directory descriptor, a NUL-terminated path and an
        // `open_how` of the size passed; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut how as *mut libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN) => continue,
            Some(libc::ELOOP) => return Err(not_regular("a symlink in the path")),
            _ => return Err(error),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::Interrupted,
        "the path kept changing while it was resolved",
    ))
}

/// The target of the symlink that the `O_PATH | O_NOFOLLOW` descriptor `link` holds.
fn read_link(link: &OwnedFd) -> io::Result<String> {
    let mut buffer = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat on a descriptor we own, with an empty path (the descriptor itself)
    // and a buffer of the length passed.
    let n = unsafe {
        libc::readlinkat(
            link.as_raw_fd(),
            c"".as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buffer.truncate(n as usize);
    String::from_utf8(buffer).map_err(|_| not_regular("a symlink to a name that is not UTF-8"))
}

/// Opens the file behind a magic link of /proc (`/proc/PID/map_files/...`,
/// `/proc/PID/exe`), for reading, if it is a regular file.
///
/// # Errors
///
/// As [`open_in`].
pub fn open_proc_link(link: &str) -> io::Result<File> {
    reopen_regular(open_path(link, 0)?)
}

/// Opens the file that `map` of process `pid` maps: through /proc/PID/map_files (the very
/// file, even deleted or replaced since; needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE),
/// else its path inside the process's root, else its path in the router's root; a path is
/// only taken when its device and inode are the mapping's. A file on a FUSE file system is
/// not opened at all.
///
/// # Errors
///
/// `Unsupported` for a file on FUSE; `PermissionDenied` when a way was refused,
/// `InvalidInput` when a path names no regular file, else `NotFound`.
pub fn open_mapped(pid: u32, map: &MapEntry) -> io::Result<File> {
    // Unreadable when the process is gone: then only the router's own root is tried.
    let process_mounts = FuseMounts::of(Root::Process(pid)).ok();
    if process_mounts
        .as_ref()
        .is_some_and(|fuse| fuse.holds_device(map.dev))
    {
        return Err(on_fuse());
    }
    let link = format!("/proc/{pid}/map_files/{:x}-{:x}", map.start, map.end);
    let mut worst = io::ErrorKind::NotFound;
    let mut note = |error: io::Error| {
        let kind = error.kind();
        if kind == io::ErrorKind::PermissionDenied
            || (kind == io::ErrorKind::InvalidInput && worst != io::ErrorKind::PermissionDenied)
        {
            worst = kind;
        }
    };
    match open_proc_link(&link) {
        Ok(file) => return Ok(file),
        Err(error) => note(error),
    }
    let by_path = |root: Root| match (root, &process_mounts) {
        (Root::Process(_), Some(fuse)) => open_walk(root, fuse, &map.path, 0),
        (Root::Process(_), None) => Err(io::ErrorKind::NotFound.into()),
        (Root::Host, _) => open_in(root, &map.path),
    };
    for root in [Root::Process(pid), Root::Host] {
        match by_path(root) {
            Ok(file) if is_mapped_file(&file, map) => return Ok(file),
            Ok(_) => {}
            Err(error) => note(error),
        }
    }
    Err(io::Error::new(
        worst,
        format!("no way to the mapped file {}", map.path),
    ))
}

/// Whether a user other than root could change `file` under a reader: its owner is not root,
/// or group or others may write it. (Files on FUSE, whose daemon decides what every read
/// returns, are never opened: see [`super::mounts`].)
pub fn others_can_change(file: &File) -> io::Result<bool> {
    let meta = file.metadata()?;
    Ok(meta.uid() != 0 || meta.mode() & 0o022 != 0)
}

/// Whether `file` is the one `map` maps (same device and inode).
fn is_mapped_file(file: &File, map: &MapEntry) -> bool {
    file.metadata()
        .is_ok_and(|meta| (device_number(&meta), meta.ino()) == (map.dev, map.inode))
}

/// The device of a file as /proc/PID/maps writes it (`major << 32 | minor`).
pub fn device_number(meta: &std::fs::Metadata) -> u64 {
    let dev = meta.dev();
    u64::from(libc::major(dev)) << 32 | u64::from(libc::minor(dev))
}

/// An `O_PATH` descriptor of `path` (following links, as /proc's magic links need).
fn open_path(path: &str, flags: i32) -> io::Result<OwnedFd> {
    let name = c_path(path)?;
    // SAFETY: open with a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens for reading the regular file that the `O_PATH` descriptor `path` holds.
fn reopen_regular(path: OwnedFd) -> io::Result<File> {
    let path = File::from(path);
    let checked = path.metadata()?;
    let kind = checked.file_type();
    if !kind.is_file() {
        return Err(not_regular(if kind.is_symlink() {
            "a symlink"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "a FIFO, socket or device"
        }));
    }
    let name = c_path(&format!("/proc/self/fd/{}", path.as_raw_fd()))?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: open with a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn on_fuse() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "on a FUSE file system: not read (its daemon could stall the reader for good)",
    )
}

fn not_regular(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file: {what}"),
    )
}

fn c_path(path: &str) -> io::Result<CString> {
    CString::new(path).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}
