//! Finding the file a process has mapped, and telling two files apart: by device, inode and
//! GNU build id, so that an inode reused after a binary is deleted does not inherit the old
//! binary's names.

use std::{fmt, fs::File, io};

use crate::{
    process::{is_running, MapEntry},
    untrusted::{open::open_mapped, read::elf_bytes},
};

/// Which file an answer belongs to: the same device and inode with a different build id is a
/// different file (the inode was reused).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    /// Device, as /proc/PID/maps writes it.
    pub dev: u64,
    /// Inode.
    pub inode: u64,
    /// The GNU build id, lowercase hex.
    pub build_id: Option<String>,
}

/// Why a process's mapped file could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unreadable {
    /// EACCES or EPERM: the router lacks a privilege (see docs/operations.md, Privileges).
    PermissionDenied,
    /// The process exited and its file is no longer at its path.
    ProcessExited,
    /// The process runs but its file was deleted or replaced, and /proc/PID/map_files
    /// cannot reach it.
    FileGone,
    /// Not an ELF file blazesym can read.
    NotElf,
    /// The path names a FIFO, a device, a symlink or a directory, not a regular file.
    NotRegularFile,
    /// A file that a user other than root can change, too large to copy before it is read.
    TooLarge,
    /// On a FUSE file system, never read (see [`crate::untrusted::mounts`]).
    OnFuse,
}

impl Unreadable {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [Unreadable; 7] = [
        Self::PermissionDenied,
        Self::ProcessExited,
        Self::FileGone,
        Self::NotElf,
        Self::NotRegularFile,
        Self::TooLarge,
        Self::OnFuse,
    ];

    /// The reason's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::PermissionDenied => "permission_denied",
            Self::ProcessExited => "process_exited",
            Self::FileGone => "file_gone",
            Self::NotElf => "not_elf",
            Self::NotRegularFile => "not_regular_file",
            Self::TooLarge => "too_large",
            Self::OnFuse => "on_fuse",
        }
    }

    /// The reason an I/O error of opening or reading `pid`'s file means.
    pub(crate) fn of_io(kind: io::ErrorKind, pid: u32) -> Self {
        match kind {
            io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            io::ErrorKind::NotFound if !is_running(pid) => Self::ProcessExited,
            io::ErrorKind::NotFound => Self::FileGone,
            io::ErrorKind::InvalidInput => Self::NotRegularFile,
            io::ErrorKind::FileTooLarge => Self::TooLarge,
            io::ErrorKind::Unsupported => Self::OnFuse,
            _ => Self::NotElf,
        }
    }

    /// The reason a blazesym error about `pid`'s file means.
    pub(crate) fn of_blazesym(error: &blazesym::Error, pid: u32) -> Self {
        match error.kind() {
            blazesym::ErrorKind::PermissionDenied => {
                Self::of_io(io::ErrorKind::PermissionDenied, pid)
            }
            blazesym::ErrorKind::NotFound => Self::of_io(io::ErrorKind::NotFound, pid),
            _ => Self::NotElf,
        }
    }
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Opens the file `map` of `pid` maps (see [`open_mapped`]) and reads its build id.
pub(crate) fn find(pid: u32, map: &MapEntry) -> Result<(FileKey, File), Unreadable> {
    let file = open(pid, map)?;
    let bytes = elf_bytes(
        file.try_clone()
            .map_err(|e| Unreadable::of_io(e.kind(), pid))?,
    )
    .map_err(|e| Unreadable::of_io(e.kind(), pid))?;
    let facts = unwind_table::elf_facts(&bytes).map_err(|_| Unreadable::NotElf)?;
    let key = FileKey {
        dev: map.dev,
        inode: map.inode,
        build_id: facts.build_id.as_deref().map(build_id_hex),
    };
    Ok((key, file))
}

/// A GNU build id as lowercase hex, as answers and debug file names know it.
pub(crate) fn build_id_hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the file `map` of `pid` maps again (see [`open_mapped`]).
pub(crate) fn open(pid: u32, map: &MapEntry) -> Result<File, Unreadable> {
    open_mapped(pid, map).map_err(|e| Unreadable::of_io(e.kind(), pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_their_reason() {
        let me = std::process::id();
        let gone = u32::MAX;
        assert_eq!(
            Unreadable::of_io(io::ErrorKind::PermissionDenied, me),
            Unreadable::PermissionDenied
        );
        assert_eq!(
            Unreadable::of_io(io::ErrorKind::PermissionDenied, gone),
            Unreadable::PermissionDenied
        );
        assert_eq!(
            Unreadable::of_io(io::ErrorKind::NotFound, me),
            Unreadable::FileGone
        );
        assert_eq!(
            Unreadable::of_io(io::ErrorKind::NotFound, gone),
            Unreadable::ProcessExited
        );
    }

    #[test]
    fn a_path_holding_another_file_is_not_the_mapped_one() {
        let me = std::process::id();
        let libc_map = crate::process::ProcessInfo::read(me)
            .unwrap()
            .maps
            .into_iter()
            .find(|m| m.path.contains("libc.so"))
            .expect("the test links libc");
        let (key, _) = find(me, &libc_map).unwrap();
        assert!(key.build_id.is_some());
        // A mapping whose file is gone, with a live process: no map_files entry, and the
        // path now holds another file (another inode).
        let replaced = MapEntry {
            start: 0x1000,
            end: 0x2000,
            inode: libc_map.inode + 1,
            ..libc_map
        };
        assert_eq!(find(me, &replaced).unwrap_err(), Unreadable::FileGone);
    }
}
