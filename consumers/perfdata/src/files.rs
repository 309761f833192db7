//! The output folder: complete files only (written to a temporary name, then renamed), and
//! retention by count and total bytes, oldest first.

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

    /// Writes `bytes` to `name` atomically: a temporary file in the same folder, synced, then
    /// renamed, so that a crash never leaves a truncated file under the final name.
    pub fn write_atomically(&self, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        fs::create_dir_all(&self.path)?;
        let target = self.path.join(name);
        let temporary = self.path.join(format!(".{name}.tmp"));
        let result = (|| {
            let mut file = fs::File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temporary, &target)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        result.map(|()| target)
    }

    /// Deletes the oldest profiles (each .data with its .runtime.elf, .folded and .svg) until at
    /// most `max_count` remain and all of them take at most `max_bytes`. Returns how many were
    /// deleted.
    pub fn enforce_retention(&self, max_count: usize, max_bytes: u64) -> std::io::Result<usize> {
        let mut profiles: Vec<(String, u64)> = Vec::new();
        for entry in fs::read_dir(&self.path)? {
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
        let mut deleted = 0;
        while profiles.len() > 1 && (profiles.len() > max_count || total > max_bytes) {
            let (base, size) = profiles.remove(0);
            for ext in EXTENSIONS {
                let _ = fs::remove_file(self.path.join(format!("{base}.{ext}")));
            }
            total -= size;
            deleted += 1;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_deletes_a_perf_data_with_its_runtime_symbol_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutputDir::new(dir.path());
        let bases: Vec<String> = (0..3u64)
            .map(|i| OutputDir::base_name(1_790_000_000_000_000_000 + i * 60_000_000_000))
            .collect();
        for base in &bases {
            for ext in EXTENSIONS {
                out.write_atomically(&format!("{base}.{ext}"), b"x")
                    .unwrap();
            }
        }
        out.write_atomically("notes.txt", b"mine").unwrap();
        assert_eq!(out.enforce_retention(1, u64::MAX).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected: Vec<String> = EXTENSIONS
            .iter()
            .map(|ext| format!("{}.{ext}", bases[2]))
            .collect();
        expected.push("notes.txt".into());
        expected.sort();
        assert_eq!(left, expected);
        assert!(out.absolute_path("a.runtime.elf").is_absolute());
    }
}
