//! The perf.data consumer plugin: writes the profiles it receives as perf.data files that
//! `perf report` and `perf script` read, with folded stacks and an SVG flame graph beside each.
//!
//! - [`perf_file`]: the perf.data encoder (pure, tested on bytes)
//! - [`folded`]: folded stacks and the flame graph
//! - [`files`]: atomic writes and retention
//! - [`config`]: the settings

pub mod config;
pub mod files;
pub mod folded;
pub mod perf_file;

use std::time::Duration;

use plugin_api::{ConsumerPlugin, PluginError, PluginMetric, ProfileBatch};

use crate::{config::Settings, files::OutputDir, folded::FoldedStacks, perf_file::PerfDataFile};

/// The profile being collected into the next file.
struct OpenProfile {
    perf: PerfDataFile,
    folded: FoldedStacks,
    batches: usize,
}

impl OpenProfile {
    fn new(cmdline: &str) -> Self {
        Self {
            perf: PerfDataFile::new(cmdline),
            folded: FoldedStacks::default(),
            batches: 0,
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

    /// Writes the open profile (perf.data, then .folded and .svg) and starts a new one. On
    /// failure the profile stays open, so the next attempt writes it with what came since.
    fn write_open_profile(&mut self) -> Result<(), PluginError> {
        if self.open.batches == 0 {
            return Ok(());
        }
        let (start, _) = self.open.perf.time_range();
        let base = OutputDir::base_name(start);
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
}
