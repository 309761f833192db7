//! A plugin that claims contract v1, so that the router's refusal is tested.

use plugin_api::{ConsumerPlugin, PluginError, ProfileBatch};

struct Nothing;

impl ConsumerPlugin for Nothing {
    fn name(&self) -> String {
        "other-contract".into()
    }

    fn consume(&mut self, _batch: &ProfileBatch) -> Result<(), PluginError> {
        Ok(())
    }
}

plugin_api::export_consumer! {
    @contract 1,
    name: "other-contract",
    version: env!("CARGO_PKG_VERSION"),
    constructor: |_: &str| Ok::<_, PluginError>(Nothing),
}
