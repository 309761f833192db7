//! The OTLP consumer plugin: sends profiles as the OpenTelemetry profiles signal to an
//! OpenTelemetry Collector, Grafana Pyroscope or any OTLP receiver, over gRPC or HTTP/protobuf.
//!
//! - [`convert`]: batches -> `ExportProfilesServiceRequest` (pure, unit-tested)
//! - [`transport`]: queue, retries, gRPC and HTTP
//! - [`config`]: the settings

pub mod config;
pub mod convert;
pub mod transport;

use std::time::Duration;

use plugin_api::{ConsumerPlugin, Health, PluginError, PluginMetric, ProfileBatch};

use crate::{
    config::Settings,
    convert::RequestBuilder,
    transport::{QueuedRequest, Transport},
};

/// Exports profiles over OTLP.
pub struct OtlpConsumer {
    settings: Settings,
    open: RequestBuilder,
    transport: Transport,
    seq: u64,
}

impl OtlpConsumer {
    /// Builds the consumer from its TOML settings; [`ConsumerPlugin::start`] starts its
    /// export thread.
    pub fn from_toml(text: &str) -> Result<Self, PluginError> {
        let settings = Settings::from_toml(text).map_err(PluginError)?;
        let transport = Transport::new(&settings);
        Ok(Self {
            open: RequestBuilder::new(settings.group_by, &settings.resource_attributes),
            settings,
            transport,
            seq: 0,
        })
    }

    fn seal(&mut self) {
        if self.open.batch_count() == 0 {
            return;
        }
        let fresh = RequestBuilder::new(self.settings.group_by, &self.settings.resource_attributes);
        let request = std::mem::replace(&mut self.open, fresh).finish();
        self.seq += 1;
        self.transport
            .queue
            .push(self.seq, QueuedRequest::new(&request));
    }
}

impl ConsumerPlugin for OtlpConsumer {
    fn name(&self) -> String {
        "otlp".into()
    }

    fn start(&mut self) -> Result<(), PluginError> {
        self.transport.start()?;
        plugin_api::info!(
            "OTLP profiles consumer started and registered: {:?}",
            self.settings
        );
        Ok(())
    }

    fn shutdown(&mut self, timeout: Duration) -> Result<(), PluginError> {
        Ok(self.transport.queue.stop(timeout)?)
    }

    fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError> {
        self.open.add_batch(batch);
        let (start, end) = self.open.time_range();
        if end.saturating_sub(start) >= self.settings.export_interval.as_nanos() as u64 {
            self.seal();
        }
        Ok(())
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), PluginError> {
        self.seal();
        let pending = self.transport.queue.wait_until_drained(timeout);
        let s = self.transport.queue.stats();
        plugin_api::info!(
            "flushed: exported={} dropped={} rejected={} retries={} partially_rejected={} pending={pending}",
            s.delivered,
            s.dropped,
            s.refused,
            s.retries,
            self.transport.partially_rejected()
        );
        if pending > 0 {
            return Err(PluginError(format!(
                "otlp: {pending} request(s) not exported within {timeout:?}"
            )));
        }
        Ok(())
    }

    fn health(&self) -> Health {
        self.transport.queue.health()
    }

    fn metrics(&self) -> Vec<PluginMetric> {
        let s = self.transport.queue.stats();
        vec![
            PluginMetric::counter(
                "exports",
                "Requests the receiver accepted",
                s.delivered as f64,
            ),
            PluginMetric::counter(
                "export_bytes",
                "Encoded request bytes accepted",
                s.delivered_bytes as f64,
            ),
            PluginMetric::counter(
                "export_seconds",
                "Time spent in successful exports",
                s.delivery_micros as f64 / 1e6,
            ),
            PluginMetric::counter(
                "dropped_requests",
                "Requests dropped because the queue was over max_queue or max_queue_bytes",
                s.dropped as f64,
            ),
            PluginMetric::counter(
                "rejected_requests",
                "Requests refused without retry",
                s.refused as f64,
            ),
            PluginMetric::counter(
                "retries",
                "Export attempts that failed and were retried",
                s.retries as f64,
            ),
            PluginMetric::counter(
                "partially_rejected_profiles",
                "Profiles a receiver rejected in a partial success",
                self.transport.partially_rejected() as f64,
            ),
            PluginMetric::gauge(
                "queued_requests",
                "Requests waiting for export",
                s.queued as f64,
            ),
            PluginMetric::gauge(
                "queued_bytes",
                "Bytes of the requests waiting for export, held encoded and gzip-compressed (max_queue_bytes at most)",
                s.queued_bytes as f64,
            ),
        ]
    }
}

plugin_api::export_consumer! {
    name: "otlp",
    version: env!("CARGO_PKG_VERSION"),
    constructor: OtlpConsumer::from_toml,
}
