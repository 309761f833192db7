//! Opening a file that another process names, so that the name cannot lead the router out of
//! that process's root, into a file it should not read, or into an open that never returns.
//!
//! A path is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` against the
//! process's root directory (`/proc/PID/root`): `..` and absolute symlinks stay inside it, as
//! the process itself would see them. The last component must not be a symlink. The file is
//! first opened with `O_PATH`, which opens nothing (no FIFO waits for a writer, no device is
//! touched), checked to be a regular file, and only then opened for reading through
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

use crate::process::MapEntry;

/// Where a path is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// The root directory of process `pid` (its chroot or its mount namespace's root).
    Process(u32),
    /// The router's own root.
    Host,
}

/// Opens `path` as it resolves inside `root`, for reading, if it is a regular file.
///
/// # Errors
///
/// The open's error; `InvalidInput` when the path ends in a symlink or names anything but
/// a regular file (a FIFO, a device, a directory, a socket).
///
/// ```
/// use router::untrusted::open::{open_in, Root};
///
/// let me = Root::Process(std::process::id());
/// assert!(open_in(me, "/proc/self/../self/exe").is_err()); // /proc/self/exe: a magic link
/// let device = open_in(me, "/dev/null").unwrap_err();
/// assert_eq!(device.kind(), std::io::ErrorKind::InvalidInput);
/// ```
pub fn open_in(root: Root, path: &str) -> io::Result<File> {
    let root_dir = match root {
        Root::Process(pid) => format!("/proc/{pid}/root"),
        Root::Host => "/".to_owned(),
    };
    let dir = open_path(&root_dir, libc::O_DIRECTORY)?;
    let relative = path.trim_start_matches('/');
    let name = c_path(if relative.is_empty() { "." } else { relative })?;
    // SAFETY: `open_how` is plain integers; zero is a valid value of each.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
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
            return reopen_regular(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN) => continue,
            Some(libc::ELOOP) => return Err(not_regular("a symlink")),
            _ => return Err(error),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::Interrupted,
        "the path kept changing while it was resolved",
    ))
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
/// only taken when its device and inode are the mapping's.
///
/// # Errors
///
/// `PermissionDenied` when a way was refused, `InvalidInput` when a path names no regular
/// file, else `NotFound`.
pub fn open_mapped(pid: u32, map: &MapEntry) -> io::Result<File> {
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
    for root in [Root::Process(pid), Root::Host] {
        match open_in(root, &map.path) {
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
/// group or others may write it, or it lives on a FUSE file system (whose daemon decides
/// what every read returns).
pub fn others_can_change(file: &File) -> io::Result<bool> {
    let meta = file.metadata()?;
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Ok(true);
    }
    // SAFETY: fstatfs into a zeroed struct, on a descriptor we own.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fs.f_type == libc::FUSE_SUPER_MAGIC)
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

fn not_regular(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file: {what}"),
    )
}

fn c_path(path: &str) -> io::Result<CString> {
    CString::new(path).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}
