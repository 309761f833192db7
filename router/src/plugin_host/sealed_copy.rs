//! Private, sealed copies of plugin files for the dynamic loader: once made, a copy can be
//! neither written, shrunk nor grown, so whatever later happens to the plugin file (truncated,
//! overwritten in place) never reaches the code the router runs.

use std::{
    fs::File,
    io::{self, Write},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::FileExt},
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::untrusted::sealed::sealed_memfd;

/// Every sealed copy made so far. None is ever closed: the dynamic loader knows a library by
/// the `/proc/self/fd/N` name it was opened with, so a number must never come to name another
/// file while that library is loaded (and plugins are never unloaded). Loading the same bytes
/// again (a second consumer of one plugin, a reload) reuses the copy, so memory grows only with
/// each distinct plugin file content.
static COPIES: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// The path the dynamic loader should open for `bytes`, the contents of plugin file `origin`:
/// a sealed in-memory copy of them, made now or earlier for the same bytes.
pub fn sealed_copy(origin: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let mut copies = COPIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let existing = copies.iter().position(|copy| holds(copy, bytes));
    let index = match existing {
        Some(index) => index,
        None => {
            copies.push(create(origin, bytes)?);
            copies.len() - 1
        }
    };
    Ok(PathBuf::from(format!(
        "/proc/self/fd/{}",
        copies[index].as_raw_fd()
    )))
}

/// Whether `copy` holds exactly `bytes`.
fn holds(copy: &File, bytes: &[u8]) -> bool {
    const CHUNK: usize = 64 * 1024;
    if copy.metadata().map(|m| m.len()).ok() != Some(bytes.len() as u64) {
        return false;
    }
    let mut buffer = vec![0; CHUNK.min(bytes.len())];
    bytes.chunks(CHUNK).enumerate().all(|(i, expected)| {
        let read = &mut buffer[..expected.len()];
        copy.read_exact_at(read, (i * CHUNK) as u64).is_ok() && read == expected
    })
}

/// A new memfd named after `origin`, holding `bytes`, sealed against every change.
fn create(origin: &Path, bytes: &[u8]) -> io::Result<File> {
    let name = origin.file_name().unwrap_or(origin.as_os_str()).as_bytes();
    sealed_memfd(name, true, |copy| copy.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_share_one_copy_and_other_bytes_get_their_own() {
        let origin = Path::new("/nowhere/libexample.so");
        let first = sealed_copy(origin, b"one plugin's bytes").unwrap();
        let again = sealed_copy(origin, b"one plugin's bytes").unwrap();
        let other = sealed_copy(origin, b"another plugin's bytes").unwrap();
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(std::fs::read(&first).unwrap(), b"one plugin's bytes");
        let link = std::fs::read_link(&first).unwrap();
        assert!(
            link.to_string_lossy().starts_with("/memfd:libexample.so"),
            "{link:?}"
        );
    }

    #[test]
    fn a_copy_cannot_be_changed() {
        let copy = sealed_copy(Path::new("libsealed.so"), b"sealed bytes").unwrap();
        let mut writer = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        assert!(
            writer.write_all(b"changed").is_err(),
            "a write went through"
        );
        assert!(writer.set_len(0).is_err(), "a truncation went through");
        assert!(writer.set_len(100).is_err(), "a growth went through");
        assert_eq!(std::fs::read(&copy).unwrap(), b"sealed bytes");
    }
}
