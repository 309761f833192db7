//! The otlp consumer plugin. Not implemented yet: loading it fails with a clear message.

use plugin_api::{ConsumerPlugin, PluginError, ProfileBatch};

/// Placeholder that is never constructed.
struct NotImplemented;

impl ConsumerPlugin for NotImplemented {
    fn name(&self) -> String {
        "otlp".into()
    }

    fn consume(&mut self, _batch: &ProfileBatch) -> Result<(), PluginError> {
        Ok(())
    }
}

fn new_consumer(_settings: &str) -> Result<NotImplemented, PluginError> {
    Err(PluginError(
        "the otlp consumer is not implemented in this build yet".into(),
    ))
}

plugin_api::export_consumer! {
    name: "otlp",
    version: env!("CARGO_PKG_VERSION"),
    constructor: new_consumer,
}
