//! A third-party consumer plugin: writes one JSON line per batch with its totals to a file.
//!
//! ```toml
//! [consumers.summary]
//! plugin = "/opt/plugins/libjsonl_summary_consumer.so"
//! output = "/var/log/profile-summary.jsonl"
//! ```

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::PathBuf,
    time::Duration,
};

use plugin_api::{ConsumerPlugin, PluginError, ProfileBatch};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The file to append to.
    output: PathBuf,
}

struct SummaryConsumer {
    out: BufWriter<File>,
}

impl SummaryConsumer {
    fn new(config_toml: &str) -> Result<Self, PluginError> {
        let settings: Settings = plugin_api::settings::parse("summary", config_toml)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&settings.output)
            .map_err(|e| {
                PluginError(format!(
                    "summary: output: cannot open {}: {e}",
                    settings.output.display()
                ))
            })?;
        Ok(Self {
            out: BufWriter::new(file),
        })
    }
}

impl ConsumerPlugin for SummaryConsumer {
    fn name(&self) -> String {
        "summary".into()
    }

    fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError> {
        // The hottest leaf function: a linear walk over samples and their stacks.
        let mut leaves: HashMap<&str, u64> = HashMap::new();
        for (sample, count) in batch.samples.iter().zip(batch.sample_counts()) {
            if let Some(leaf) = batch.stack(sample.stack).next() {
                *leaves.entry(batch.str(leaf.function)).or_default() += count;
            }
        }
        let hottest = leaves
            .iter()
            .max_by_key(|(name, n)| (**n, *name))
            .map(|(name, _)| *name);
        let line = serde_json::json!({
            "start_ns": batch.start_ns,
            "end_ns": batch.end_ns,
            "samples": batch.samples.len(),
            "events": batch.total_events(),
            "processes": batch.processes.len(),
            "hottest_leaf": hottest,
        });
        writeln!(self.out, "{line}")?;
        Ok(())
    }

    fn flush(&mut self, _timeout: Duration) -> Result<(), PluginError> {
        self.out.flush()?;
        Ok(())
    }
}

plugin_api::export_consumer! {
    name: "summary",
    version: env!("CARGO_PKG_VERSION"),
    constructor: SummaryConsumer::new,
}
