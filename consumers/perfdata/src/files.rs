//! The output folder: complete files only (written to a temporary name, then renamed), whole
//! profiles only (all of a profile's files, or none), and retention by count and total bytes,
//! oldest first, applied before each write so that it makes the room the new profile needs.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

/// File name prefix of every file this consumer writes.
const PREFIX: &str = "perf-";

/// Extensions of the files of one profile, after its base name: the perf.data, the runtime
/// frames' symbol file it refers to, the folded stacks and the flame graph.
const EXTENSIONS: [&str; 4] = ["data", crate::runtime_symbols::EXTENSION, "folded", "svg"];

/// A profile file that could not be written, and why.
#[derive(Debug)]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong (`No space left on device`...).
    pub error: std::io::Error,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write {}: {}", self.path.display(), self.error)
    }
}

/// The folder the consumer writes to.
pub struct OutputDir {
    path: PathBuf,
}

impl OutputDir {
    /// The folder at `path` (created on first write).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// The base name (no extension) of the files that start at `start_ns`:
    /// `perf-20261123T124501.123Z`.
    pub fn base_name(start_ns: u64) -> String {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(start_ns);
        let stamp = humantime::format_rfc3339_millis(time).to_string();
        format!("{PREFIX}{}", stamp.replace([':', '-'], ""))
    }

    /// The absolute path `name` will have in the folder (relative to the current directory
    /// when the folder's path is relative).
    pub fn absolute_path(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        std::path::absolute(&path).unwrap_or(path)
    }

    /// An unnamed temporary file in the folder (created when missing), gone when closed: where
    /// a profile's records wait for its perf.data ([`crate::perf_file::PerfDataFile::spill_to`]).
    pub fn spill_file(&self) -> std::io::Result<fs::File> {
        fs::create_dir_all(&self.path)?;
        tempfile::tempfile_in(&self.path)
    }

    /// Starts writing the files of profile `base`: none appears under its final name before
    /// [`StagedProfile::commit`].
    pub fn stage(&self, base: &str) -> StagedProfile<'_> {
        StagedProfile {
            dir: self,
            base: base.to_owned(),
            files: Vec::new(),
            bytes: 0,
        }
    }

    /// Makes room for a profile of `incoming_bytes`: deletes the oldest profiles (each .data
    /// with its .runtime.elf, .folded and .svg) until, with the new one, at most `max_count`
    /// profiles take at most `max_bytes`. A folder not created yet holds nothing. Returns how
    /// many perf.data files were deleted.
    pub fn make_room(
        &self,
        max_count: usize,
        max_bytes: u64,
        incoming_bytes: u64,
    ) -> std::io::Result<u64> {
        let entries = match fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut profiles: Vec<(String, u64)> = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let base = EXTENSIONS
                .iter()
                .find_map(|ext| name.strip_suffix(ext)?.strip_suffix('.'))
                .filter(|base| base.starts_with(PREFIX));
            let Some(base) = base.map(str::to_owned) else {
                continue;
            };
            let size = entry.metadata().map_or(0, |m| m.len());
            match profiles.iter_mut().find(|(b, _)| *b == base) {
                Some((_, total)) => *total += size,
                None => profiles.push((base, size)),
            }
        }
        profiles.sort();
        let mut total: u64 = profiles.iter().map(|(_, s)| s).sum();
        let mut kept = profiles.len();
        let mut deleted_data_files = 0;
        for (base, size) in &profiles {
            if kept < max_count && total.saturating_add(incoming_bytes) <= max_bytes {
                break;
            }
            for ext in EXTENSIONS {
                let removed = fs::remove_file(self.path.join(format!("{base}.{ext}"))).is_ok();
                if removed && ext == "data" {
                    deleted_data_files += 1;
                }
            }
            kept -= 1;
            total -= size;
        }
        Ok(deleted_data_files)
    }
}

/// The files of one profile being written, each streamed to a temporary name in the folder
/// and synced; [`Self::commit`] gives them their final names, in the order written, so that a
/// crash never leaves a truncated file under a final name and a profile is there whole or not
/// at all. Dropped before, it removes what it wrote.
pub struct StagedProfile<'a> {
    dir: &'a OutputDir,
    base: String,
    /// (temporary, final) path of each file written, in order.
    files: Vec<(PathBuf, PathBuf)>,
    bytes: u64,
}

impl StagedProfile<'_> {
    /// Writes file `BASE.extension` (under a temporary name) with `write`, through a buffer.
    pub fn add(
        &mut self,
        extension: &str,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), WriteError> {
        let name = format!("{}.{extension}", self.base);
        let target = self.dir.path.join(&name);
        let temporary = self.dir.path.join(format!(".{name}.tmp"));
        let written = (|| {
            fs::create_dir_all(&self.dir.path)?;
            let mut out = std::io::BufWriter::new(fs::File::create(&temporary)?);
            write(&mut out)?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            file.metadata().map(|m| m.len())
        })();
        match written {
            Ok(bytes) => {
                self.bytes += bytes;
                self.files.push((temporary, target));
                Ok(())
            }
            Err(error) => {
                let _ = fs::remove_file(&temporary);
                Err(WriteError {
                    path: target,
                    error,
                })
            }
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Renames every file to its final name, in the order written. When one cannot be, those
    /// already renamed and the rest are removed; returns its final path and why.
    pub fn commit(mut self) -> Result<(), WriteError> {
        let files = std::mem::take(&mut self.files);
        for (done, (temporary, target)) in files.iter().enumerate() {
            if let Err(error) = fs::rename(temporary, target) {
                for (temporary, target) in &files[..done] {
                    let _ = fs::remove_file(target);
                    let _ = fs::remove_file(temporary);
                }
                for (temporary, _) in &files[done..] {
                    let _ = fs::remove_file(temporary);
                }
                return Err(WriteError {
                    path: target.clone(),
                    error,
                });
            }
        }
        Ok(())
    }
}

impl Drop for StagedProfile<'_> {
    fn drop(&mut self) {
        for (temporary, _) in &self.files {
            let _ = fs::remove_file(temporary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Writes profile `base`'s files `extensions`, each holding `bytes`.
    fn write(
        out: &OutputDir,
        base: &str,
        extensions: &[&str],
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        let mut staged = out.stage(base);
        for ext in extensions {
            staged.add(ext, |w| w.write_all(bytes))?;
        }
        staged.commit()
    }

    fn base(i: u64) -> String {
        OutputDir::base_name(1_790_000_000_000_000_000 + i * 60_000_000_000)
    }

    #[test]
    fn retention_deletes_a_perf_data_with_its_runtime_symbol_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutputDir::new(dir.path());
        let bases: Vec<String> = (0..3).map(base).collect();
        for base in &bases {
            write(&out, base, &EXTENSIONS, b"x").unwrap();
        }
        fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        assert_eq!(out.make_room(2, u64::MAX, 0).unwrap(), 2, "perf.data files");
        let mut expected: Vec<String> = EXTENSIONS
            .iter()
            .map(|ext| format!("{}.{ext}", bases[2]))
            .collect();
        expected.push("notes.txt".into());
        expected.sort();
        assert_eq!(names_in(dir.path()), expected);
        assert!(out.absolute_path("a.runtime.elf").is_absolute());
    }

    #[test]
    fn retention_makes_room_for_the_incoming_profile_before_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutputDir::new(&dir.path().join("not-yet-created"));
        assert_eq!(
            out.make_room(1, 0, 1).unwrap(),
            0,
            "no folder, nothing to delete"
        );
        for i in 0..4 {
            write(&out, &base(i), &["data"], &[0; 100]).unwrap();
        }
        assert_eq!(out.make_room(10, 400, 0).unwrap(), 0, "within limits");
        assert_eq!(out.make_room(10, 400, 150).unwrap(), 2, "250 + 150 fit");
        assert_eq!(out.make_room(10, 0, 1).unwrap(), 2, "nothing fits: all go");
        assert_eq!(names_in(out.path.as_path()), Vec::<String>::new());
    }

    #[test]
    fn a_profile_that_cannot_be_written_whole_leaves_none_of_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutputDir::new(dir.path());
        let base = base(0);
        // A folder where the flame graph should go: renaming the file over it fails.
        fs::create_dir(dir.path().join(format!("{base}.svg"))).unwrap();
        let files = ["data", "folded", "svg"];
        let error = write(&out, &base, &files, b"bytes").unwrap_err();
        assert_eq!(error.path, dir.path().join(format!("{base}.svg")));
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot write {}", error.path.display())),
            "{error}"
        );
        assert_eq!(names_in(dir.path()), vec![format!("{base}.svg")]);
        fs::remove_dir(dir.path().join(format!("{base}.svg"))).unwrap();
        write(&out, &base, &files, b"bytes").unwrap();
        assert_eq!(names_in(dir.path()).len(), 3);
    }

    #[test]
    fn a_staged_profile_shows_nothing_until_committed_and_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutputDir::new(dir.path());
        let mut staged = out.stage(&base(0));
        staged.add("data", |w| w.write_all(b"data")).unwrap();
        let failed = staged.add("svg", |_| Err(std::io::ErrorKind::StorageFull.into()));
        assert_eq!(
            failed.unwrap_err().path,
            dir.path().join(format!("{}.svg", base(0)))
        );
        assert_eq!(staged.bytes(), 4);
        assert_eq!(
            out.make_room(1, 4, 4).unwrap(),
            0,
            "temporary files are not profiles"
        );
        drop(staged);
        assert_eq!(names_in(dir.path()), Vec::<String>::new());
    }
}
