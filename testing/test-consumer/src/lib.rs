//! A consumer plugin for the router's own tests: writes one JSON line per call to a file and
//! can be told to be slow, to fail, or to panic, in a call or in a delivery thread of its own.

use std::{fs::OpenOptions, io::Write, path::PathBuf, thread, time::Duration};

use plugin_api::{
    delivery::{Attempt, Backoff, DeliveryQueue, QueueLimits, Wording},
    ConsumerPlugin, Health, PluginError, ProfileBatch,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The file that gets one JSON line per call; none: only count (for benchmarks).
    #[serde(default)]
    output: Option<PathBuf>,
    /// Sleep this long in every `consume`.
    #[serde(default)]
    sleep_ms: u64,
    /// Panic in `consume` for the batch with this sequence number (1-based).
    #[serde(default)]
    panic_on_batch: Option<u64>,
    /// Hand every batch's number to a delivery thread, which panics on this one (1-based).
    #[serde(default)]
    worker_panics_on_batch: Option<u64>,
}

struct TestConsumer {
    settings: Settings,
    batches: u64,
    /// The delivery thread's queue of batch numbers, with `worker_panics_on_batch`.
    worker: Option<DeliveryQueue<String>>,
}

impl TestConsumer {
    fn from_toml(text: &str) -> Result<Self, PluginError> {
        let settings: Settings =
            toml::from_str(text).map_err(|e| PluginError(format!("test-consumer: {e}")))?;
        let worker = settings.worker_panics_on_batch.map(|_| {
            let wording = Wording {
                verb: "deliver",
                item: "batch",
            };
            let limits = QueueLimits {
                items: 100,
                bytes: QueueLimits::DEFAULT_BYTES,
            };
            let backoff = Backoff {
                first: Duration::from_millis(10),
                max: Duration::from_millis(10),
            };
            DeliveryQueue::new("test-worker", wording, limits, backoff)
        });
        Ok(Self {
            settings,
            batches: 0,
            worker,
        })
    }

    fn write(&self, line: serde_json::Value) -> Result<(), PluginError> {
        let Some(output) = &self.settings.output else {
            return Ok(());
        };
        let mut file = OpenOptions::new().create(true).append(true).open(output)?;
        writeln!(file, "{line}")?;
        Ok(())
    }
}

impl ConsumerPlugin for TestConsumer {
    fn name(&self) -> String {
        "test-consumer".into()
    }

    fn start(&mut self) -> Result<(), PluginError> {
        if let (Some(worker), Some(fatal)) =
            (&mut self.worker, self.settings.worker_panics_on_batch)
        {
            worker.start(move |seq: &String| {
                if seq.parse() == Ok(fatal) {
                    panic!("told to panic in the worker on batch {fatal}");
                }
                Attempt::Delivered { bytes: 0 }
            })?;
        }
        Ok(())
    }

    fn health(&self) -> Health {
        self.worker
            .as_ref()
            .map(DeliveryQueue::health)
            .unwrap_or_default()
    }

    fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError> {
        self.batches += 1;
        if let Some(worker) = &self.worker {
            worker.push(self.batches, self.batches.to_string());
        }
        if self.settings.panic_on_batch == Some(self.batches) {
            panic!("told to panic on batch {}", self.batches);
        }
        if self.settings.sleep_ms > 0 {
            thread::sleep(Duration::from_millis(self.settings.sleep_ms));
        }
        if self.settings.output.is_none() {
            return Ok(());
        }
        self.write(serde_json::json!({
            "call": "consume",
            "unix_ms": unix_ms(),
            "seq": self.batches,
            "start_ns": batch.start_ns,
            "end_ns": batch.end_ns,
            "samples": batch.samples.len(),
            "events": batch.total_events(),
        }))
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), PluginError> {
        self.write(serde_json::json!({"call": "flush", "timeout_ms": timeout.as_millis() as u64}))
    }

    fn shutdown(&mut self, timeout: Duration) -> Result<(), PluginError> {
        if let Some(worker) = &mut self.worker {
            worker.stop(timeout)?;
        }
        self.write(serde_json::json!({"call": "shutdown"}))
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

plugin_api::export_consumer! {
    name: "test-consumer",
    version: env!("CARGO_PKG_VERSION"),
    constructor: TestConsumer::from_toml,
}
