//! The perf.data consumer plugin: writes the profiles it receives as perf.data files that
//! `perf report` and `perf script` read, with folded stacks and an SVG flame graph beside each,
//! and, when the profile has interpreted or JIT-compiled frames, the ELF file with their names
//! (`perf-….runtime.elf`; see [`runtime_symbols`] for what to copy along with a perf.data).
//!
//! - [`perf_file`]: the perf.data encoder (pure, tested on bytes)
//! - [`runtime_symbols`]: names of Python and JIT frames, as an ELF symbol table perf reads
//! - [`folded`]: folded stacks and the flame graph
//! - [`files`]: atomic writes of whole profiles, and retention
//! - [`config`]: the settings

pub mod config;
pub mod files;
pub mod folded;
pub mod perf_file;
pub mod runtime_symbols;

use std::time::Duration;

use plugin_api::{ConsumerPlugin, PluginError, PluginMetric, ProfileBatch};

use crate::{
    config::Settings,
    files::{OutputDir, WriteError},
    folded::FoldedStacks,
    perf_file::PerfDataFile,
};

/// Extension of the perf.data files: `perf-STAMP.data`.
const DATA_EXTENSION: &str = "data";

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

    /// Bytes of its files, the flame graph's (unknown until rendered) aside.
    fn known_bytes(&self, runtime_elf: Option<&[u8]>, flamegraph: bool) -> u64 {
        let folded = if flamegraph {
            self.folded.text_len()
        } else {
            0
        };
        runtime_elf.map_or(0, |elf| elf.len() as u64) + self.perf.file_len() + folded
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

/// What the consumer wrote so far, and what it could not write.
#[derive(Default)]
struct WriteStats {
    /// perf.data files written.
    files: u64,
    /// Bytes of those perf.data files.
    bytes: u64,
    /// Sample records in them.
    samples: u64,
    /// perf.data files deleted by retention.
    deleted_by_retention: u64,
    /// perf.data files that could not be written and were dropped.
    dropped_files: u64,
    /// Sample records in the dropped files.
    dropped_samples: u64,
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

    /// Writes the open profile and starts a new one, whether the write succeeds or not.
    /// Retention first makes room for it; a profile that still cannot be written (disk full,
    /// unwritable folder) is dropped, none of its files left behind, counted, and named with
    /// the reason in the error; the next one starts afresh, so writing resumes once there is
    /// room again.
    fn write_open_profile(&mut self) -> Result<(), PluginError> {
        if self.open.batches == 0 {
            return Ok(());
        }
        let profile = std::mem::replace(&mut self.open, OpenProfile::new(&self.cmdline));
        if profile.perf.sample_count() == 0 {
            // An idle interval (or one whose processes were all filtered out): perf refuses a
            // perf.data without samples, and there is nothing to look at.
            return Ok(());
        }
        let base = profile
            .base
            .clone()
            .unwrap_or_else(|| OutputDir::base_name(profile.perf.time_range().0));
        let samples = profile.perf.sample_count();
        let data_bytes = profile.perf.file_len();
        if let Err(e) = self.write_profile(profile, &base) {
            self.written.dropped_files += 1;
            self.written.dropped_samples += samples;
            return Err(PluginError(format!(
                "perfdata: {e}; dropped the profile ({samples} samples)"
            )));
        }
        self.written.files += 1;
        self.written.bytes += data_bytes;
        self.written.samples += samples;
        plugin_api::info!(
            "wrote {} ({samples} samples)",
            self.settings
                .path
                .join(format!("{base}.{DATA_EXTENSION}"))
                .display()
        );
        Ok(())
    }

    /// Writes the files of `profile` as `base.EXTENSION`, in this order: the runtime frames'
    /// symbol file (so that no perf.data names a file not there yet), the perf.data, then the
    /// folded stacks and the flame graph when `flamegraph` is on. Each part of the profile is
    /// freed once its file is written, and no file is held whole in memory but the folded
    /// text, which inferno reads: on a fork storm that text is the largest thing the agent
    /// holds, and it is built only after the perf.data records are gone. Retention makes room
    /// for the files before they are written, and again once the flame graph's size is known.
    fn write_profile(&mut self, profile: OpenProfile, base: &str) -> Result<(), WriteError> {
        let flamegraph = self.settings.flamegraph && !profile.folded.is_empty();
        let runtime_elf = profile
            .perf
            .runtime_symbols()
            .filter(|s| !s.is_empty())
            .map(runtime_symbols::RuntimeSymbols::to_elf);
        self.written.deleted_by_retention +=
            self.make_room(profile.known_bytes(runtime_elf.as_deref(), flamegraph));
        let OpenProfile { perf, folded, .. } = profile;
        let mut staged = self.dir.stage(base);
        if let Some(elf) = runtime_elf {
            staged.add(runtime_symbols::EXTENSION, |out| out.write_all(&elf))?;
        }
        staged.add(DATA_EXTENSION, |out| perf.write_to(out))?;
        drop(perf);
        if flamegraph {
            // Inferno has nothing to draw when every count is zero.
            let drawable = folded.total() > 0;
            let text = folded.into_text();
            staged.add("folded", |out| out.write_all(text.as_str().as_bytes()))?;
            if drawable {
                let title = format!("CPU profile {base}");
                staged.add("svg", |out| text.write_svg(&title, out))?;
                self.written.deleted_by_retention += self.make_room(staged.bytes());
            }
        }
        staged.commit()
    }

    /// Deletes the oldest profiles until one of `incoming_bytes` fits the retention limits;
    /// returns how many perf.data files went.
    fn make_room(&self, incoming_bytes: u64) -> u64 {
        self.dir
            .make_room(
                self.settings.retention_count,
                self.settings.retention_bytes,
                incoming_bytes,
            )
            .unwrap_or_else(|e| {
                plugin_api::warn!(
                    "retention in {}: {e}; writing without it",
                    self.settings.path.display()
                );
                0
            })
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
            // Without a spill file (an unwritable folder) the records wait in memory, and the
            // write that follows says why the folder cannot be written.
            if let Ok(file) = self.dir.spill_file() {
                self.open.perf.spill_to(file);
            }
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
                "perf.data files deleted by retention (each with its .folded, .svg, .runtime.elf)",
                w.deleted_by_retention as f64,
            ),
            PluginMetric::counter(
                "files_dropped",
                "perf.data files dropped because they could not be written (disk full, unwritable folder)",
                w.dropped_files as f64,
            ),
            PluginMetric::counter(
                "dropped_samples",
                "Sample records in the dropped perf.data files",
                w.dropped_samples as f64,
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

    fn metric(consumer: &PerfDataConsumer, name: &str) -> f64 {
        consumer
            .metrics()
            .into_iter()
            .find(|m| m.name.as_str() == name)
            .unwrap_or_else(|| panic!("metric {name}"))
            .value
    }

    #[test]
    fn an_unwritable_folder_drops_each_profile_counts_it_and_says_which() {
        let mut consumer = PerfDataConsumer::from_toml(
            "path = \"/proc/profile-router-test/unwritable\"\nrotate_interval = \"1s\"",
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
                consumer.open.batches == 1,
                "each failed write starts afresh"
            );
        }
        assert_eq!(errors.len(), 19, "{errors:?}");
        assert!(
            errors.iter().all(|e| e
                .starts_with("perfdata: cannot write /proc/profile-router-test/unwritable/perf-")
                && e.ends_with("dropped the profile (1000 samples)")),
            "{errors:?}"
        );
        assert_eq!(metric(&consumer, "files_dropped"), 19.0);
        assert_eq!(metric(&consumer, "dropped_samples"), 19_000.0);
        assert_eq!(metric(&consumer, "files_written"), 0.0);
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
