//! Finding the file a process has mapped, and telling two files apart: by device, inode and
//! GNU build id, so that an inode reused after a binary is deleted does not inherit the old
//! binary's names.

use std::{
    fmt, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::process::{is_running, MapEntry};

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

/// A process's mapped file, found.
#[derive(Clone, Debug)]
pub(crate) struct MappedFile {
    /// Where the router opens it.
    pub path: PathBuf,
    /// What it is.
    pub key: FileKey,
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
}

impl Unreadable {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [Unreadable; 4] = [
        Self::PermissionDenied,
        Self::ProcessExited,
        Self::FileGone,
        Self::NotElf,
    ];

    /// The reason's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::PermissionDenied => "permission_denied",
            Self::ProcessExited => "process_exited",
            Self::FileGone => "file_gone",
            Self::NotElf => "not_elf",
        }
    }

    /// The reason an I/O error of opening or reading `pid`'s file means.
    pub(crate) fn of_io(kind: io::ErrorKind, pid: u32) -> Self {
        match kind {
            io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            io::ErrorKind::NotFound if !is_running(pid) => Self::ProcessExited,
            io::ErrorKind::NotFound => Self::FileGone,
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

/// Finds the file `map` of `pid` maps and reads its build id. The mapping itself through
/// /proc/PID/map_files (the very file, even deleted or replaced since; needs CAP_SYS_ADMIN
/// or CAP_CHECKPOINT_RESTORE), else the path in the process's mount namespace, else the path
/// in ours; a path is only taken when its device and inode are the mapping's.
pub(crate) fn find(pid: u32, map: &MapEntry) -> Result<MappedFile, Unreadable> {
    let candidates = [
        (
            PathBuf::from(format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                map.start, map.end
            )),
            false,
        ),
        (PathBuf::from(format!("/proc/{pid}/root{}", map.path)), true),
        (PathBuf::from(&map.path), true),
    ];
    let mut denied = false;
    for (path, check_identity) in candidates {
        match path.metadata() {
            Ok(meta) if !check_identity || (dev_of(&meta), meta.ino()) == (map.dev, map.inode) => {
                let build_id =
                    read_build_id(&path).map_err(|e| Unreadable::of_blazesym(&e, pid))?;
                let key = FileKey {
                    dev: map.dev,
                    inode: map.inode,
                    build_id,
                };
                return Ok(MappedFile { path, key });
            }
            Ok(_) => {}
            Err(e) => denied |= e.kind() == io::ErrorKind::PermissionDenied,
        }
    }
    Err(if denied {
        Unreadable::PermissionDenied
    } else {
        Unreadable::of_io(io::ErrorKind::NotFound, pid)
    })
}

/// The device of a file as /proc/PID/maps writes it (`major << 32 | minor`).
pub(crate) fn dev_of(meta: &std::fs::Metadata) -> u64 {
    let dev = meta.dev();
    u64::from(libc::major(dev)) << 32 | u64::from(libc::minor(dev))
}

fn read_build_id(path: &Path) -> Result<Option<String>, blazesym::Error> {
    let id = blazesym::helper::read_elf_build_id(path)?;
    Ok(id.map(|id| id.iter().map(|b| format!("{b:02x}")).collect()))
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
        let found = find(me, &libc_map).unwrap();
        assert!(found.key.build_id.is_some());
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
