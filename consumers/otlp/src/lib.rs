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

use plugin_api::{ConsumerPlugin, PluginError, ProfileBatch};

use crate::{config::Settings, convert::RequestBuilder, transport::Transport};

/// Exports profiles over OTLP.
pub struct OtlpConsumer {
    settings: Settings,
    open: RequestBuilder,
    transport: Transport,
    seq: u64,
}

impl OtlpConsumer {
    /// Builds the consumer from its TOML settings and starts its export thread.
    pub fn from_toml(text: &str) -> Result<Self, PluginError> {
        let settings = Settings::from_toml(text).map_err(PluginError)?;
        let transport = Transport::start(&settings).map_err(PluginError)?;
        eprintln!("otlp: OTLP profiles consumer started and registered: {settings:?}");
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
        self.transport.enqueue(self.seq, request);
    }
}

impl ConsumerPlugin for OtlpConsumer {
    fn name(&self) -> String {
        "otlp".into()
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
        let pending = self.transport.wait_until_drained(timeout);
        let s = self.transport.stats();
        eprintln!(
            "otlp: flushed: exported={} dropped={} rejected={} retries={} partially_rejected={} pending={pending}",
            s.exported, s.dropped, s.rejected, s.retries, s.partially_rejected
        );
        if pending > 0 {
            return Err(PluginError(format!(
                "otlp: {pending} request(s) not exported within {timeout:?}"
            )));
        }
        Ok(())
    }
}

plugin_api::export_consumer! {
    name: "otlp",
    version: env!("CARGO_PKG_VERSION"),
    constructor: OtlpConsumer::from_toml,
}
