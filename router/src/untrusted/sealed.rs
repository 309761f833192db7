//! Sealed memfd copies: once made, a copy can be neither written, shrunk nor grown, so a
//! mapping of it never faults, whatever happens to the file it was copied from.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Write},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::fs::FileExt,
    },
};

/// A new memfd named `name` (shown in /proc/PID/maps as `/memfd:NAME (deleted)`), filled by
/// `fill`, then sealed against every change. `executable`: whether it may be mapped as code.
pub fn sealed_memfd(
    name: &[u8],
    executable: bool,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<File> {
    // The kernel takes 249 bytes of a name.
    let name = CString::new(name[..name.len().min(200)].to_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a memfd name"))?;
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    let mode = if executable {
        libc::MFD_EXEC
    } else {
        libc::MFD_NOEXEC_SEAL
    };
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked below.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), flags | mode) };
    if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // Kernels before 6.3 know neither flag; their memfds are executable anyway.
        // SAFETY: as above.
        fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    }
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let mut copy = unsafe { File::from_raw_fd(fd) };
    fill(&mut copy)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(copy)
}

/// A sealed, not executable copy of `file`, named `name`, if it holds at most `max_bytes`.
///
/// # Errors
///
/// `FileTooLarge` beyond `max_bytes`; `UnexpectedEof` when the file shrank while it was
/// copied; the error of a read or of the memfd.
pub fn sealed_copy_of(file: &File, name: &str, max_bytes: u64) -> io::Result<File> {
    let len = file.metadata()?.len();
    if len > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("{len} bytes, over the {max_bytes} a copy may hold"),
        ));
    }
    sealed_memfd(name.as_bytes(), false, |copy| {
        let mut buffer = vec![0; 64 << 10];
        let mut copied = 0;
        while copied < len {
            let want = buffer.len().min((len - copied) as usize);
            let n = file.read_at(&mut buffer[..want], copied)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was copied",
                ));
            }
            copy.write_all(&buffer[..n])?;
            copied += n as u64;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_its_bytes_when_its_origin_is_truncated_and_cannot_be_changed() {
        let mut origin = tempfile::tempfile().unwrap();
        origin.write_all(b"the original bytes").unwrap();
        let copy = sealed_copy_of(&origin, "origin", 1 << 20).unwrap();
        origin.set_len(0).unwrap();
        let mut read = [0u8; 18];
        copy.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(&read, b"the original bytes");
        assert!(
            (&copy).write_all(b"changed").is_err(),
            "a write went through"
        );
        assert!(copy.set_len(0).is_err(), "a truncation went through");

        origin.write_all_at(&[0; 100], 0).unwrap();
        let refused = sealed_copy_of(&origin, "origin", 99).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::FileTooLarge);
    }
}
