//! The one place where things are wired together: producer -> bus -> consumers.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering::Relaxed, Arc},
};

use abi_stable::std_types::RResult;
use plugin_api::CONTRACT_VERSION;
use router_config::RouterConfig;

use crate::{
    bus::Bus,
    plugin_host::{self, LoadedConsumer, PluginLoadError},
    producer,
    recording::Recorder,
    shutdown::{install_signal_handlers, StopSignal},
    telemetry::{self, ProducerStats, Telemetry},
};

/// The plugin folder in force: `plugin_dir`, or the router binary's own folder.
pub fn plugin_dir(config: &RouterConfig) -> PathBuf {
    config
        .plugin_dir
        .clone()
        .unwrap_or_else(plugin_host::default_plugin_dir)
}

/// Loads every enabled consumer with its queue capacity; reports every failure, not just the
/// first.
pub fn load_consumers(
    config: &RouterConfig,
) -> Result<Vec<(LoadedConsumer, usize)>, Vec<PluginLoadError>> {
    let dir = plugin_dir(config);
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (name, entry) in config.consumers.iter().filter(|(_, e)| e.enabled) {
        let file = entry
            .plugin_file(name)
            .expect("validated: every consumer has a plugin file");
        let path = plugin_host::resolve(&dir, &file);
        match plugin_host::load_consumer(name, &path, &entry.settings_toml()) {
            Ok(consumer) => {
                tracing::info!(
                    "consumer {name} loaded (plugin {}, {} {}, contract v{CONTRACT_VERSION})",
                    path.display(),
                    consumer.plugin_name,
                    consumer.plugin_version
                );
                loaded.push((
                    consumer,
                    entry.queue_capacity.unwrap_or(config.queue_capacity),
                ));
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// `router --check`: validates plugins and the producer and says what is wrong; the consumers
/// are built (their settings checked) but never started. Returns whether everything is usable.
pub fn check(config: &RouterConfig) -> bool {
    let mut ok = true;
    match load_consumers(config) {
        Ok(consumers) => {
            for (c, _) in consumers {
                println!(
                    "ok: consumer {} (plugin {}, {} {}, contract v{CONTRACT_VERSION})",
                    c.name,
                    c.path.display(),
                    c.plugin_name,
                    c.plugin_version
                );
            }
        }
        Err(errors) => {
            ok = false;
            for e in errors {
                println!("error: {e}");
            }
        }
    }
    match producer::build(&config.producer, Arc::default()) {
        Ok(p) => println!("ok: producer {}", p.name()),
        Err(e) => {
            ok = false;
            println!("error: producer: {e:#}");
        }
    }
    ok
}

/// Starts what each consumer runs in the background; names every consumer that fails to.
fn start_consumers(consumers: &mut [(LoadedConsumer, usize)]) -> anyhow::Result<()> {
    let failures: Vec<String> = consumers
        .iter_mut()
        .filter_map(|(c, _)| match c.consumer.start() {
            RResult::ROk(()) => {
                tracing::info!("consumer {} started and registered", c.name);
                None
            }
            RResult::RErr(e) => Some(format!(
                "consumer {}: plugin {} failed to start: {e}",
                c.name,
                c.path.display()
            )),
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(failures.join("\n")))
    }
}

/// Runs the agent until the producer ends or a signal stops it, then delivers what was
/// collected, flushes every consumer and shuts them down within `shutdown_timeout`.
pub fn run(config: &RouterConfig, record: Option<&Path>) -> anyhow::Result<()> {
    let mut consumers = load_consumers(config).map_err(|errors| {
        anyhow::anyhow!(errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"))
    })?;
    start_consumers(&mut consumers)?;
    let producer_stats = Arc::new(ProducerStats::default());
    let mut producer = producer::build(&config.producer, producer_stats.clone())?;
    let mut recorder = record.map(Recorder::create).transpose()?;
    let stop = StopSignal::new();
    install_signal_handlers(stop.clone())?;

    let shutdown_timeout = config.shutdown_timeout.0;
    let bus = Bus::start(consumers, shutdown_timeout);
    if let Some(listen) = config.telemetry.listen {
        let telemetry = Telemetry {
            producer: producer_stats.clone(),
            consumers: bus.stats(),
        };
        telemetry::serve(listen, telemetry)?;
    }
    producer_stats.running.store(true, Relaxed);
    tracing::info!(producer = producer.name(), "router started");
    let mut recording_failed = false;
    let result = producer.run(
        &mut |batch| {
            tracing::debug!(
                samples = batch.samples.len(),
                stacks = batch.stacks.len(),
                "publishing batch"
            );
            if let Some(r) = recorder.as_mut().filter(|_| !recording_failed) {
                if let Err(e) = r.write(&batch) {
                    tracing::error!("recording stopped: {e:#}");
                    recording_failed = true;
                }
            }
            producer_stats.count_batch(&batch);
            bus.publish(batch);
        },
        &stop,
    );
    producer_stats.running.store(false, Relaxed);
    if let Err(e) = &result {
        tracing::error!("producer {} failed: {e:#}", producer.name());
    }
    let unfinished = bus.shutdown(shutdown_timeout);
    tracing::info!(unfinished = unfinished.len(), "router stopped");
    result
}
