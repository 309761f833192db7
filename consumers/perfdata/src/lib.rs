//! The perf.data consumer plugin: writes the profiles it receives as perf.data files that
//! `perf report` and `perf script` read, with folded stacks and an SVG flame graph beside each,
//! and, when the profile has interpreted or JIT-compiled frames, the ELF file with their names
//! (`perf-….runtime.elf`; see [`runtime_symbols`] for what to copy along with a perf.data).
//!
//! - [`perf_file`]: the perf.data encoder (pure, tested on bytes)
//! - [`runtime_symbols`]: names of Python and JIT frames, as an ELF symbol table perf reads
//! - [`folded`]: folded stacks and the flame graph
//! - [`files`]: atomic writes and retention
//! - [`config`]: the settings

pub mod config;
pub mod files;
pub mod folded;
pub mod perf_file;
pub mod runtime_symbols;

use std::time::Duration;

use plugin_api::{ConsumerPlugin, PluginError, PluginMetric, ProfileBatch};

use crate::{config::Settings, files::OutputDir, folded::FoldedStacks, perf_file::PerfDataFile};

/// The profile being collected into the next file.
struct OpenProfile {
    perf: PerfDataFile,
    folded: FoldedStacks,
    batches: usize,
    /// Base name of its files, from its first batch's start.
    base: Option<String>,
}

impl OpenProfile {
    fn new(cmdline: &str) -> Self {
        Self {
            perf: PerfDataFile::new(cmdline),
            folded: FoldedStacks::default(),
            batches: 0,
            base: None,
        }
    }
}

/// Writes batches into rotating perf.data files.
pub struct PerfDataConsumer {
    settings: Settings,
    dir: OutputDir,
    open: OpenProfile,
    cmdline: String,
    written: WriteStats,
}

/// What the consumer wrote so far.
#[derive(Default)]
struct WriteStats {
    files: u64,
    bytes: u64,
    samples: u64,
    deleted_by_retention: u64,
}

impl PerfDataConsumer {
    /// Builds the consumer from its TOML settings.
    pub fn from_toml(text: &str) -> Result<Self, PluginError> {
        let settings = Settings::from_toml(text).map_err(PluginError)?;
        let cmdline = std::env::args().collect::<Vec<_>>().join(" ");
        Ok(Self {
            dir: OutputDir::new(&settings.path),
            settings,
            open: OpenProfile::new(&cmdline),
            cmdline,
            written: WriteStats::default(),
        })
    }

    fn due_for_rotation(&self, next: &ProfileBatch) -> bool {
        let (start, _) = self.open.perf.time_range();
        self.open.batches > 0
            && (next.end_ns.saturating_sub(start) > self.settings.rotate_interval.as_nanos() as u64
                || self.open.perf.data_len() as u64 >= self.settings.rotate_size)
    }

    /// Writes the open profile (the runtime frames' symbol file first, so that no perf.data
    /// names a file not there yet, then perf.data, .folded and .svg) and starts a new one. On
    /// failure the profile stays open, so the next attempt writes it with what came since.
    fn write_open_profile(&mut self) -> Result<(), PluginError> {
        if self.open.batches == 0 {
            return Ok(());
        }
        let base = match &self.open.base {
            Some(base) => base.clone(),
            None => OutputDir::base_name(self.open.perf.time_range().0),
        };
        if let Some(symbols) = self.open.perf.runtime_symbols().filter(|s| !s.is_empty()) {
            let elf = symbols.to_elf();
            self.dir
                .write_atomically(&format!("{base}.{}", runtime_symbols::EXTENSION), &elf)
                .map_err(|e| self.write_error(&base, runtime_symbols::EXTENSION, e))?;
        }
        let bytes = self.open.perf.finish();
        let path = self
            .dir
            .write_atomically(&format!("{base}.data"), &bytes)
            .map_err(|e| self.write_error(&base, "data", e))?;
        self.written.files += 1;
        self.written.bytes += bytes.len() as u64;
        self.written.samples += self.open.perf.sample_count();
        if self.settings.flamegraph && !self.open.folded.is_empty() {
            self.dir
                .write_atomically(
                    &format!("{base}.folded"),
                    self.open.folded.to_text().as_bytes(),
                )
                .map_err(|e| self.write_error(&base, "folded", e))?;
            let svg = self
                .open
                .folded
                .to_svg(&format!("CPU profile {base}"))
                .map_err(|e| {
                    PluginError(format!(
                        "perfdata: rendering the flame graph of {base}: {e}"
                    ))
                })?;
            self.dir
                .write_atomically(&format!("{base}.svg"), &svg)
                .map_err(|e| self.write_error(&base, "svg", e))?;
        }
        plugin_api::info!(
            "wrote {} ({} samples)",
            path.display(),
            self.open.perf.sample_count()
        );
        self.open = OpenProfile::new(&self.cmdline);
        self.dir
            .enforce_retention(self.settings.retention_count, self.settings.retention_bytes)
            .map_err(|e| {
                PluginError(format!(
                    "perfdata: retention in {}: {e}",
                    self.settings.path.display()
                ))
            })?;
        Ok(())
    }

    fn write_error(&self, base: &str, ext: &str, e: std::io::Error) -> PluginError {
        PluginError(format!(
            "perfdata: cannot write {}/{base}.{ext}: {e}",
            self.settings.path.display()
        ))
    }
}

impl ConsumerPlugin for PerfDataConsumer {
    fn name(&self) -> String {
        "perfdata".into()
    }

    fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError> {
        let rotated = if self.due_for_rotation(batch) {
            self.write_open_profile()
        } else {
            Ok(())
        };
        if let Err(error) = &rotated {
            if self.open.perf.data_len() as u64 >= 2 * self.settings.rotate_size {
                // The folder stays unwritable: bound the memory, say what was dropped.
                let dropped = self.open.perf.sample_count();
                self.open = OpenProfile::new(&self.cmdline);
                return Err(PluginError(format!(
                    "{}; dropped the unwritten profile ({dropped} samples) to bound memory",
                    error.0
                )));
            }
        }
        if self.open.batches == 0 {
            // The files' names are known now: the runtime frames' symbol file can be named in
            // the MMAP2 records, by its absolute path (perf opens it by that name).
            let base = OutputDir::base_name(batch.start_ns);
            let symbols = self
                .dir
                .absolute_path(&format!("{base}.{}", runtime_symbols::EXTENSION));
            self.open
                .perf
                .set_runtime_symbol_file(&symbols.to_string_lossy());
            self.open.base = Some(base);
        }
        self.open.perf.add_batch(batch);
        self.open.folded.add_batch(batch);
        self.open.batches += 1;
        rotated
    }

    fn flush(&mut self, _timeout: Duration) -> Result<(), PluginError> {
        self.write_open_profile()
    }

    fn metrics(&self) -> Vec<PluginMetric> {
        let w = &self.written;
        vec![
            PluginMetric::counter("files_written", "perf.data files written", w.files as f64),
            PluginMetric::counter(
                "written_bytes",
                "Bytes of perf.data written",
                w.bytes as f64,
            ),
            PluginMetric::counter(
                "written_samples",
                "Sample records written",
                w.samples as f64,
            ),
            PluginMetric::counter(
                "files_deleted_by_retention",
                "Profiles deleted by retention",
                w.deleted_by_retention as f64,
            ),
            PluginMetric::gauge(
                "open_profile_bytes",
                "Bytes of records waiting for the next file",
                self.open.perf.data_len() as f64,
            ),
        ]
    }
}

plugin_api::export_consumer! {
    name: "perfdata",
    version: env!("CARGO_PKG_VERSION"),
    constructor: PerfDataConsumer::from_toml,
}

#[cfg(test)]
mod tests {
    use plugin_api::fixtures::{synthetic_batch, BatchShape};

    use super::*;

    #[test]
    fn an_unwritable_folder_costs_bounded_memory_and_says_what_was_dropped() {
        let mut consumer = PerfDataConsumer::from_toml(
            "path = \"/proc/profile-router-test/unwritable\"\nrotate_size = \"100kB\"",
        )
        .unwrap();
        let shape = BatchShape {
            samples: 1_000,
            ..BatchShape::BENCH
        };
        let mut errors = Vec::new();
        for i in 0..20 {
            let batch = synthetic_batch(shape, 1_000_000_000 + i * 10_000_000_000);
            if let Err(e) = consumer.consume(&batch) {
                errors.push(e.0);
            }
            assert!(
                consumer.open.perf.data_len() < 3 * 100_000 + 200_000,
                "bounded"
            );
        }
        assert!(errors
            .iter()
            .all(|e| e.contains("cannot write /proc/profile-router-test/unwritable/perf-")));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("dropped the unwritten profile")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_profile_with_runtime_frames_leaves_their_symbol_file_beside_the_perf_data() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "path = \"{}\"\nrotate_interval = \"10s\"",
            dir.path().display()
        );
        let mut consumer = PerfDataConsumer::from_toml(&toml).unwrap();
        let start = 1_790_000_000_000_000_000;
        consumer
            .consume(&crate::perf_file::tests::runtime_batch(start))
            .unwrap();
        let native = synthetic_batch(BatchShape::BENCH, start + 20_000_000_000);
        consumer.consume(&native).unwrap();
        consumer.flush(Duration::from_secs(1)).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let first = OutputDir::base_name(start);
        let second = OutputDir::base_name(start + 20_000_000_000);
        let ext = runtime_symbols::EXTENSION;
        for name in [format!("{first}.data"), format!("{first}.{ext}")] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(
            !names.contains(&format!("{second}.{ext}")),
            "no runtime frames, no file: {names:?}"
        );
        let data = std::fs::read(dir.path().join(format!("{first}.data"))).unwrap();
        let companion = dir.path().join(format!("{first}.{ext}"));
        let needle = companion.to_string_lossy().into_owned();
        assert!(
            data.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the MMAP2 records name the file by its absolute path"
        );
    }
}
