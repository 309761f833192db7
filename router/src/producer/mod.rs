//! Producers of profile batches, behind one small trait.

pub mod ebpf;
mod replay;

use std::{sync::Arc, time::Duration};

use plugin_api::ProfileBatch;
use router_config::{ProducerConfig, ProducerKind};

pub use replay::ReplayProducer;

use crate::{shutdown::StopSignal, telemetry::ProducerStats};

/// Something that produces one [`ProfileBatch`] per interval.
pub trait Producer: Send {
    /// A short name for logs (`ebpf`, `replay`).
    fn name(&self) -> &'static str;

    /// The longest it goes between two batches when all is well (`/healthz` allows a few).
    fn interval(&self) -> Duration;

    /// Produces batches and hands each to `publish`, until `stop` is triggered (then it
    /// publishes the partial interval it was collecting) or its source ends.
    fn run(
        &mut self,
        publish: &mut dyn FnMut(ProfileBatch),
        stop: &StopSignal,
    ) -> anyhow::Result<()>;
}

/// Builds the configured producer; fails when it cannot start (missing file, privileges).
/// `stats` receives the producer's own counters (symbolization cache).
pub fn build(
    config: &ProducerConfig,
    stats: Arc<ProducerStats>,
) -> anyhow::Result<Box<dyn Producer>> {
    match config.kind {
        ProducerKind::Replay => Ok(Box::new(ReplayProducer::open(&config.replay)?)),
        ProducerKind::Ebpf => Ok(Box::new(ebpf::EbpfProducer::start(config, stats)?)),
    }
}
