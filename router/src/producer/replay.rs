//! The replay producer: publishes the batches of a recording, so that tests and benchmarks
//! run without root or eBPF.

use std::time::{Duration, Instant};

use plugin_api::ProfileBatch;
use router_config::ReplayConfig;

use super::Producer;
use crate::{recording::read_recording, shutdown::StopSignal};

/// Publishes recorded batches, paced by their recorded durations or as fast as possible.
pub struct ReplayProducer {
    batches: Vec<ProfileBatch>,
    speed: f64,
    repeat: u32,
}

impl ReplayProducer {
    /// Reads the recording named by `config.path`.
    pub fn open(config: &ReplayConfig) -> anyhow::Result<Self> {
        let path = config
            .path
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("producer.replay.path: no recording given"))?;
        let batches = read_recording(path)?;
        tracing::info!(path = %path.display(), batches = batches.len(), "replaying recording");
        Ok(Self::new(batches, config.speed, config.repeat))
    }

    /// Replays `batches` `repeat` times; `speed` 0 publishes without waiting.
    pub fn new(batches: Vec<ProfileBatch>, speed: f64, repeat: u32) -> Self {
        Self {
            batches,
            speed,
            repeat: repeat.max(1),
        }
    }
}

impl Producer for ReplayProducer {
    fn name(&self) -> &'static str {
        "replay"
    }

    /// The longest batch's recorded duration at the replay's speed (none at speed 0).
    fn interval(&self) -> Duration {
        if self.speed == 0.0 {
            return Duration::ZERO;
        }
        self.batches
            .iter()
            .map(|batch| wall_duration(batch, self.speed))
            .max()
            .unwrap_or_default()
    }

    fn run(
        &mut self,
        publish: &mut dyn FnMut(ProfileBatch),
        stop: &StopSignal,
    ) -> anyhow::Result<()> {
        for _ in 0..self.repeat {
            for batch in &self.batches {
                if self.speed == 0.0 {
                    if stop.is_triggered() {
                        return Ok(());
                    }
                    publish(batch.clone());
                    continue;
                }
                let wall = wall_duration(batch, self.speed);
                let started = Instant::now();
                if stop.wait(wall) {
                    let elapsed = started.elapsed().mul_f64(self.speed);
                    publish(partial(batch, elapsed));
                    return Ok(());
                }
                publish(batch.clone());
            }
        }
        Ok(())
    }
}

/// How long `batch` takes to replay at `speed` (above 0): its recorded duration, sped up.
fn wall_duration(batch: &ProfileBatch, speed: f64) -> Duration {
    Duration::from_nanos(batch.end_ns.saturating_sub(batch.start_ns)).div_f64(speed)
}

/// The part of `batch` collected in its first `elapsed`: its samples up to then.
fn partial(batch: &ProfileBatch, elapsed: Duration) -> ProfileBatch {
    let cut = batch.start_ns + elapsed.as_nanos() as u64;
    let mut partial = batch.clone();
    partial.end_ns = cut.min(batch.end_ns);
    partial.samples.retain(|s| s.timestamp_ns <= partial.end_ns);
    partial
}
