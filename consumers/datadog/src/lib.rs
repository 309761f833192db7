//! The Datadog consumer plugin: merges batches into one pprof per `upload_interval` and uploads
//! it to the Datadog Agent (or, with an API key, straight to Datadog's intake) in the intake
//! format version 4 that Datadog's own profilers use.
//!
//! - [`pprof`]: batches -> pprof (pure, tested on bytes)
//! - [`event`]: event.json and tags
//! - [`exporter`]: queue, retries, HTTP
//! - [`config`]: the settings

pub mod config;
pub mod event;
pub mod exporter;
pub mod pprof;

use std::{io::Write, time::Duration};

use plugin_api::{
    delivery::DeliveryQueue, ConsumerPlugin, PluginError, PluginMetric, ProfileBatch,
};

use crate::{
    config::{Compression, Settings},
    event::{event_json, ProfileInfo},
    exporter::Upload,
    pprof::PprofBuilder,
};

/// The profile being merged for the next upload.
struct OpenProfile {
    pprof: PprofBuilder,
    batches: usize,
    host: String,
    arch: String,
}

impl OpenProfile {
    fn new() -> Self {
        Self {
            pprof: PprofBuilder::new(),
            batches: 0,
            host: String::new(),
            arch: String::new(),
        }
    }
}

/// Uploads profiles to Datadog.
pub struct DatadogConsumer {
    settings: Settings,
    open: OpenProfile,
    exporter: DeliveryQueue<Upload>,
    seq: u64,
}

impl DatadogConsumer {
    /// Builds the consumer from its TOML settings and starts its upload thread.
    pub fn from_toml(text: &str) -> Result<Self, PluginError> {
        let settings = Settings::from_toml(text).map_err(PluginError)?;
        let exporter = exporter::start(&settings).map_err(PluginError)?;
        plugin_api::info!(
            "Datadog profiling consumer started and registered: {:?}, service {}, upload every {:?}",
            settings.destination, settings.service, settings.upload_interval
        );
        Ok(Self {
            settings,
            open: OpenProfile::new(),
            exporter,
            seq: 0,
        })
    }

    /// Compresses the open profile and queues it for upload.
    fn seal_open_profile(&mut self) -> Result<(), PluginError> {
        if self.open.batches == 0 {
            return Ok(());
        }
        let open = std::mem::replace(&mut self.open, OpenProfile::new());
        let (start_ns, end_ns) = open.pprof.time_range();
        self.seq += 1;
        let info = ProfileInfo {
            start_ns,
            end_ns,
            seq: self.seq,
            host: open.host,
            arch: open.arch,
            remote_symbols: open.pprof.has_unsymbolized_frames(),
        };
        let pprof = compress(&open.pprof.encode(), self.settings.compression)
            .map_err(|e| PluginError(format!("datadog: compressing profile #{}: {e}", self.seq)))?;
        let upload = Upload {
            event: event_json(&self.settings, &info),
            pprof,
            batches: open.batches,
            seq: self.seq,
        };
        self.exporter.push(self.seq, upload);
        Ok(())
    }
}

/// The pprof bytes compressed as configured.
pub fn compress(bytes: &[u8], compression: Compression) -> std::io::Result<Vec<u8>> {
    match compression {
        Compression::Zstd => zstd::encode_all(bytes, 1),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(bytes)?;
            encoder.finish()
        }
    }
}

impl ConsumerPlugin for DatadogConsumer {
    fn name(&self) -> String {
        "datadog".into()
    }

    fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError> {
        let (start_ns, _) = self.open.pprof.time_range();
        let due = self.open.batches > 0
            && batch.end_ns.saturating_sub(start_ns)
                > self.settings.upload_interval.as_nanos() as u64;
        if due {
            self.seal_open_profile()?;
        }
        if self.open.batches == 0 {
            self.open.host = batch.str(batch.host.hostname).to_owned();
            self.open.arch = batch.str(batch.host.arch).to_owned();
        }
        self.open.pprof.add_batch(batch);
        self.open.batches += 1;
        Ok(())
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), PluginError> {
        self.seal_open_profile()?;
        let pending = self.exporter.wait_until_drained(timeout);
        let stats = self.exporter.stats();
        plugin_api::info!(
            "flushed: uploaded={} dropped={} rejected={} retries={} pending={pending}",
            stats.delivered,
            stats.dropped,
            stats.refused,
            stats.retries
        );
        if pending > 0 {
            return Err(PluginError(format!(
                "datadog: {pending} profile(s) not uploaded within {timeout:?}"
            )));
        }
        Ok(())
    }

    fn metrics(&self) -> Vec<PluginMetric> {
        let s = self.exporter.stats();
        vec![
            PluginMetric::counter(
                "uploads",
                "Profiles the backend accepted",
                s.delivered as f64,
            ),
            PluginMetric::counter(
                "upload_bytes",
                "Compressed pprof bytes accepted",
                s.delivered_bytes as f64,
            ),
            PluginMetric::counter(
                "upload_seconds",
                "Time spent in successful uploads",
                s.delivery_micros as f64 / 1e6,
            ),
            PluginMetric::gauge(
                "last_upload_seconds",
                "Duration of the last successful upload",
                s.last_delivery_micros as f64 / 1e6,
            ),
            PluginMetric::counter(
                "dropped_profiles",
                "Profiles dropped because the upload queue was full",
                s.dropped as f64,
            ),
            PluginMetric::counter(
                "rejected_profiles",
                "Profiles refused with a 4xx",
                s.refused as f64,
            ),
            PluginMetric::counter(
                "retries",
                "Upload attempts that failed and were retried",
                s.retries as f64,
            ),
            PluginMetric::gauge(
                "queued_profiles",
                "Profiles waiting for upload",
                s.queued as f64,
            ),
        ]
    }
}

plugin_api::export_consumer! {
    name: "datadog",
    version: env!("CARGO_PKG_VERSION"),
    constructor: DatadogConsumer::from_toml,
}
