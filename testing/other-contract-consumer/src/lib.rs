//! A plugin that claims another contract version, so that the router's refusal is tested.

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
    @contract plugin_api::CONTRACT_VERSION + 1,
    name: "other-contract",
    version: env!("CARGO_PKG_VERSION"),
    constructor: |_: &str| Ok::<_, PluginError>(Nothing),
}
