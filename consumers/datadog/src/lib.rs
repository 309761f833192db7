//! The Datadog consumer plugin: merges batches into one pprof per `upload_interval` and uploads
//! it to the Datadog Agent (or, with an API key, straight to Datadog's intake) in the intake
//! format version 4 that Datadog's own profilers use.
//!
//! - [`pprof`]: batches -> pprof (pure, tested on bytes)
//! - [`interned`]: the table of distinct stacks and strings it keeps until it encodes
//! - [`event`]: event.json and tags
//! - [`exporter`]: queue, retries, HTTP
//! - [`agent_info`]: the Agent's `/info`, checked once at startup
//! - [`config`]: the settings

pub mod agent_info;
pub mod config;
pub mod event;
pub mod exporter;
pub mod interned;
pub mod pprof;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use plugin_api::{
    abi_stable::std_types::RString, delivery::DeliveryQueue, ConsumerPlugin, Health, PluginError,
    PluginMetric, ProfileBatch,
};

use crate::{
    config::{Compression, Destination, Settings},
    event::{event_json, ProcessService, ProfileInfo},
    exporter::Upload,
    pprof::PprofBuilder,
};

/// The profile being merged for the next upload of one service.
struct OpenProfile {
    pprof: PprofBuilder,
    host: String,
    arch: String,
    /// The containers of its processes (`None`: a process outside any container).
    containers: BTreeSet<Option<String>>,
}

impl OpenProfile {
    fn new(batch: &ProfileBatch) -> Self {
        Self {
            pprof: PprofBuilder::new(),
            host: batch.str(batch.host.hostname).to_owned(),
            arch: batch.str(batch.host.arch).to_owned(),
            containers: BTreeSet::new(),
        }
    }

    /// The container every process of the profile runs in, when they share one.
    fn one_container(&self) -> Option<String> {
        match (self.containers.len(), self.containers.first()) {
            (1, Some(Some(id))) => Some(id.clone()),
            _ => None,
        }
    }
}

/// Uploads profiles to Datadog.
pub struct DatadogConsumer {
    settings: Settings,
    /// One profile per service (`None`: the consumer's own `service`), for this interval.
    open: BTreeMap<Option<ProcessService>, OpenProfile>,
    /// Batches merged into the open profiles.
    batches: usize,
    exporter: DeliveryQueue<Upload>,
    seq: u64,
    /// Samples that went into the `service` upload because `max_services` was reached.
    samples_over_max_services: u64,
    /// What the startup check of the Agent found wrong, until an upload gets through.
    agent_problem: Arc<Mutex<Option<String>>>,
    /// The thread that checks the Agent's `/info`, once started.
    agent_check: Option<JoinHandle<()>>,
}

impl DatadogConsumer {
    /// Builds the consumer from its TOML settings; [`ConsumerPlugin::start`] starts its
    /// threads.
    pub fn from_toml(text: &str) -> Result<Self, PluginError> {
        let settings = Settings::from_toml(text).map_err(PluginError)?;
        Ok(Self {
            exporter: exporter::queue(&settings),
            settings,
            open: BTreeMap::new(),
            batches: 0,
            seq: 0,
            samples_over_max_services: 0,
            agent_problem: Arc::new(Mutex::new(None)),
            agent_check: None,
        })
    }

    /// The service of each process of `batch`, as the uploads are split.
    fn services_of(&mut self, batch: &ProfileBatch) -> HashMap<u32, Option<ProcessService>> {
        if !self.settings.split_by_service {
            return HashMap::new();
        }
        let text = |id| {
            Some(batch.str(id))
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        batch
            .processes
            .iter()
            .map(|p| {
                let service = text(p.service).map(|name| ProcessService {
                    name,
                    inferred: p.service_inferred,
                    env: text(p.env),
                    version: text(p.version),
                });
                (p.pid, service)
            })
            .collect()
    }

    /// Compresses the open profiles and queues them for upload.
    fn seal_open_profiles(&mut self) -> Result<(), PluginError> {
        let open = std::mem::take(&mut self.open);
        let batches = std::mem::take(&mut self.batches);
        for (service, profile) in open {
            if profile.pprof.sample_count() == 0 {
                continue;
            }
            let (start_ns, end_ns) = profile.pprof.time_range();
            self.seq += 1;
            let container_id = profile.one_container();
            let info = ProfileInfo {
                start_ns,
                end_ns,
                seq: self.seq,
                host: profile.host,
                arch: profile.arch,
                remote_symbols: profile.pprof.has_unsymbolized_frames(),
                service,
            };
            let pprof = compress(profile.pprof, self.settings.compression).map_err(|e| {
                PluginError(format!("datadog: compressing profile #{}: {e}", self.seq))
            })?;
            let upload = Upload {
                event: event_json(&self.settings, &info),
                pprof,
                batches,
                seq: self.seq,
                container_id,
            };
            self.exporter.push(self.seq, upload);
        }
        Ok(())
    }
}

/// The profile encoded and compressed as configured, the encoding streamed into the
/// compressor: a minute of a busy host's samples is never held uncompressed.
pub fn compress(pprof: PprofBuilder, compression: Compression) -> std::io::Result<Vec<u8>> {
    match compression {
        Compression::Zstd => {
            let mut encoder = zstd::Encoder::new(Vec::new(), 1)?;
            pprof.encode_to(&mut encoder)?;
            encoder.finish()
        }
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            pprof.encode_to(&mut encoder)?;
            encoder.finish()
        }
    }
}

impl ConsumerPlugin for DatadogConsumer {
    fn name(&self) -> String {
        "datadog".into()
    }

    fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError> {
        let start_ns = self
            .open
            .values()
            .map(|p| p.pprof.time_range().0)
            .min()
            .unwrap_or(u64::MAX);
        let due = self.batches > 0
            && batch.end_ns.saturating_sub(start_ns)
                > self.settings.upload_interval.as_nanos() as u64;
        if due {
            self.seal_open_profiles()?;
        }
        // Each sampled process's upload: its service's, or the consumer's own (`None`) for
        // processes without one and, past `max_services`, for new services (counted).
        let mut services = self.services_of(batch);
        let sampled: HashSet<u32> = batch.samples.iter().map(|s| s.pid).collect();
        let mut by_service: BTreeMap<Option<ProcessService>, HashSet<u32>> = BTreeMap::new();
        for pid in sampled {
            let mut service = services.remove(&pid).flatten();
            if service.is_some() && !self.open.contains_key(&service) {
                if self.open.len() < self.settings.max_services {
                    self.open.insert(service.clone(), OpenProfile::new(batch));
                } else {
                    self.samples_over_max_services +=
                        batch.samples.iter().filter(|s| s.pid == pid).count() as u64;
                    service = None;
                }
            }
            by_service.entry(service).or_default().insert(pid);
        }
        for (service, pids) in by_service {
            let profile = self
                .open
                .entry(service)
                .or_insert_with(|| OpenProfile::new(batch));
            profile.pprof.add_samples(batch, |pid| pids.contains(&pid));
            for pid in pids {
                let container = batch
                    .process(pid)
                    .map(|p| batch.str(p.container_id))
                    .filter(|c| !c.is_empty());
                profile.containers.insert(container.map(str::to_owned));
            }
        }
        self.batches += 1;
        Ok(())
    }

    fn start(&mut self) -> Result<(), PluginError> {
        // A blocking HTTP client runs a thread of its own: it is made here, not when the
        // settings are checked, and ends with the threads that hold it.
        let client = exporter::client(&self.settings)?;
        exporter::start(&mut self.exporter, &self.settings, client.clone())?;
        if let Destination::Agent { url } = &self.settings.destination {
            let url = url.clone();
            let problem = self.agent_problem.clone();
            let check = plugin_api::log::spawn("datadog-agent-info", move || {
                if let Some(found) = agent_info::check(&client, &url) {
                    plugin_api::warn!("{found}");
                    *problem.lock().unwrap() = Some(found);
                }
            });
            self.agent_check =
                Some(check.map_err(|e| format!("datadog: cannot start the Agent check: {e}"))?);
        }
        let settings = &self.settings;
        plugin_api::info!(
            "Datadog profiling consumer started and registered: {:?}, service {}, upload every {:?}{}",
            settings.destination,
            settings.service,
            settings.upload_interval,
            if settings.split_by_service {
                ", one upload per service"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn shutdown(&mut self, timeout: Duration) -> Result<(), PluginError> {
        let deadline = Instant::now() + timeout;
        self.exporter.stop(timeout)?;
        if let Some(check) = self.agent_check.take() {
            plugin_api::log::join_within(
                check,
                deadline.saturating_duration_since(Instant::now()),
            )?;
        }
        Ok(())
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), PluginError> {
        self.seal_open_profiles()?;
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

    fn health(&self) -> Health {
        let mut problem = self.agent_problem.lock().unwrap();
        if self.exporter.stats().delivered > 0 {
            // An upload got through: whatever the startup check found is fixed.
            *problem = None;
        }
        Health {
            problem: problem.clone().map(RString::from).into(),
            ..self.exporter.health()
        }
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
                "Profiles dropped because the upload queue was over max_queue or max_queue_bytes",
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
            PluginMetric::gauge(
                "queued_bytes",
                "Bytes of the profiles waiting for upload (max_queue_bytes at most)",
                s.queued_bytes as f64,
            ),
            PluginMetric::counter(
                "samples_over_max_services",
                "Samples uploaded under the consumer's own service because max_services was reached",
                self.samples_over_max_services as f64,
            ),
        ]
    }
}

plugin_api::export_consumer! {
    name: "datadog",
    version: env!("CARGO_PKG_VERSION"),
    constructor: DatadogConsumer::from_toml,
}

#[cfg(test)]
mod tests {
    use plugin_api::{
        fixtures::{synthetic_batch, BatchShape},
        ProfileBatch,
    };

    use super::*;

    /// A batch of four processes, each its own service (`svc-0` .. `svc-3`).
    fn four_services() -> ProfileBatch {
        let shape = BatchShape {
            samples: 400,
            unique_stacks: 8,
            depth: 6,
            processes: 4,
            kernel_frames: 0,
        };
        let mut batch = synthetic_batch(shape, 1_000_000);
        for i in 0..batch.processes.len() {
            batch.strings.push(format!("svc-{i}").as_str().into());
            batch.processes[i].service = batch.strings.len() as u32 - 1;
        }
        batch
    }

    fn consumer(extra: &str) -> DatadogConsumer {
        DatadogConsumer::from_toml(&format!(
            "agent_url = \"http://127.0.0.1:9/profiling/v1/input\"\nupload_interval = \"1h\"\n{extra}"
        ))
        .unwrap()
    }

    fn open_services(consumer: &DatadogConsumer) -> Vec<Option<String>> {
        consumer
            .open
            .keys()
            .map(|k| k.as_ref().map(|s| s.name.clone()))
            .collect()
    }

    #[test]
    fn past_max_services_the_rest_goes_into_the_consumers_own_upload_counted() {
        let batch = four_services();
        let mut split = consumer("max_services = 2");
        split.consume(&batch).unwrap();
        let open = open_services(&split);
        assert_eq!(open.len(), 3, "two services and the rest: {open:?}");
        assert!(open.contains(&None));
        let samples: usize = split.open.values().map(|p| p.pprof.sample_count()).sum();
        assert_eq!(samples, batch.samples.len(), "every sample in one upload");
        let over = split.open[&None].pprof.sample_count() as u64;
        assert!(over > 0 && split.samples_over_max_services == over);

        let mut single = consumer("split_by_service = false");
        single.consume(&batch).unwrap();
        assert_eq!(open_services(&single), [None]);
        assert_eq!(single.open[&None].pprof.sample_count(), batch.samples.len());
    }
}
