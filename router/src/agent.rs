//! The one place where things are wired together: producer -> bus -> consumers.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    thread,
};

use abi_stable::std_types::RResult;
use plugin_api::CONTRACT_VERSION;
use router_config::{ConfigError, RouterConfig};

use crate::{
    bus::Bus,
    logging::LogLevel,
    plugin_host::{self, LoadedConsumer, PluginLoadError},
    producer,
    recording::Recorder,
    shutdown::{AgentSignals, Request, StopSignal},
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
    load_each(config, config.consumers.keys())
}

/// Loads the enabled consumers among `names`; every failure is reported.
fn load_each<'a>(
    config: &RouterConfig,
    names: impl Iterator<Item = &'a String>,
) -> Result<Vec<(LoadedConsumer, usize)>, Vec<PluginLoadError>> {
    let mut loaded = Vec::new();
    let mut errors: Vec<_> = plugin_host::check_plugin_dir(&plugin_dir(config))
        .err()
        .into_iter()
        .collect();
    for name in names {
        let Some(wanted) = WantedConsumer::of(config, name) else {
            continue;
        };
        match plugin_host::load_consumer(name, &wanted.path, &wanted.settings) {
            Ok(consumer) => {
                tracing::info!(
                    "consumer {name} loaded (plugin {}, {} {}, contract v{CONTRACT_VERSION})",
                    wanted.path.display(),
                    consumer.plugin_name,
                    consumer.plugin_version
                );
                loaded.push((consumer, wanted.capacity));
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

/// What an enabled consumer is made of: when any of it changes, a reload replaces it.
#[derive(PartialEq)]
struct WantedConsumer {
    path: PathBuf,
    settings: String,
    capacity: usize,
}

impl WantedConsumer {
    /// Consumer `name` of `config`; `None` when it is absent or disabled.
    fn of(config: &RouterConfig, name: &str) -> Option<Self> {
        let entry = config.consumers.get(name).filter(|e| e.enabled)?;
        let file = entry
            .plugin_file(name)
            .expect("validated: every consumer has a plugin file");
        Some(Self {
            path: plugin_host::resolve(&plugin_dir(config), &file),
            settings: entry.settings_toml(),
            capacity: entry.queue_capacity.unwrap_or(config.queue_capacity),
        })
    }
}

/// `router --check`: validates plugins and the producer and says what is wrong; the consumers
/// are built (their settings checked) but never started. Returns whether everything is usable.
pub fn check(config: &RouterConfig) -> bool {
    let mut ok = true;
    match load_consumers(config) {
        Ok(consumers) => {
            for (c, _) in consumers {
                say(&format!(
                    "ok: consumer {} (plugin {}, {} {}, contract v{CONTRACT_VERSION})",
                    c.name,
                    c.path.display(),
                    c.plugin_name,
                    c.plugin_version
                ));
            }
        }
        Err(errors) => {
            ok = false;
            for e in errors {
                say(&format!("error: {e}"));
            }
        }
    }
    match producer::build(&config.producer, Arc::default()) {
        Ok(p) => say(&format!("ok: producer {}", p.name())),
        Err(e) => {
            ok = false;
            say(&format!("error: producer: {e:#}"));
        }
    }
    ok
}

/// One line of `--check`'s report on stdout; a closed stdout loses it rather than the check.
fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
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

/// What a SIGHUP needs: the configuration read again from the same sources, and the log
/// filter to change.
pub struct Reload {
    /// Reads the configuration file, the environment and the flags again.
    pub load: Box<dyn Fn() -> Result<RouterConfig, ConfigError> + Send>,
    /// The running log filter.
    pub log_level: LogLevel,
}

/// Runs the agent until the producer ends or a signal stops it, then delivers what was
/// collected, flushes every consumer and shuts them down within `shutdown_timeout`. SIGHUP
/// reloads the configuration meanwhile.
pub fn run(
    config: RouterConfig,
    record: Option<&Path>,
    signals: AgentSignals,
    reload: Reload,
) -> anyhow::Result<()> {
    let stop = StopSignal::new();
    let (requests, requested) = mpsc::channel();
    signals.handle(stop.clone(), requests.clone())?;
    let mut consumers = load_consumers(&config).map_err(|errors| {
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

    let shutdown_timeout = config.shutdown_timeout.0;
    let bus = Arc::new(Bus::start(consumers, shutdown_timeout));
    if let Some(listen) = config.telemetry.listen {
        let telemetry = Telemetry {
            producer: producer_stats.clone(),
            consumers: bus.clone(),
            stale_after: config.telemetry.stale_after.0,
            listener: Arc::default(),
        };
        telemetry::serve(listen, telemetry)?;
    }
    let reloader = {
        let bus = bus.clone();
        thread::Builder::new()
            .name("reload".into())
            .spawn(move || reload_on_request(&requested, &bus, config, &reload))?
    };
    producer_stats.started(producer.interval());
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
    producer_stats.stopped();
    if let Err(e) = &result {
        tracing::error!("producer {} failed: {e:#}", producer.name());
    }
    let _ = requests.send(Request::Stop);
    let _ = reloader.join();
    let unfinished = bus.shutdown(shutdown_timeout);
    tracing::info!(unfinished = unfinished.len(), "router stopped");
    result
}

/// Applies each reload request until [`Request::Stop`].
fn reload_on_request(
    requests: &mpsc::Receiver<Request>,
    bus: &Bus,
    mut running: RouterConfig,
    reload: &Reload,
) {
    while let Ok(Request::Reload) = requests.recv() {
        match (reload.load)() {
            Ok(config) => match apply(&running, &config, bus, &reload.log_level) {
                Ok(()) => running = config,
                Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
            },
            Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
        }
    }
}

/// Moves the agent from `running` to `config`: consumers whose table (or plugin file, or
/// queue) changed are replaced, new ones added, dropped ones removed, each old instance
/// flushing what it has first. Nothing changes unless every new consumer loads and starts.
fn apply(
    running: &RouterConfig,
    config: &RouterConfig,
    bus: &Bus,
    log_level: &LogLevel,
) -> Result<(), String> {
    let mut names: Vec<&String> = running.consumers.keys().collect();
    names.extend(
        config
            .consumers
            .keys()
            .filter(|n| !running.consumers.contains_key(*n)),
    );
    let changed: Vec<&String> = names
        .into_iter()
        .filter(|n| WantedConsumer::of(running, n) != WantedConsumer::of(config, n))
        .collect();
    let mut loaded = load_each(config, changed.iter().copied()).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    if let Err(e) = start_consumers(&mut loaded) {
        for (consumer, _) in &mut loaded {
            let _ = consumer
                .consumer
                .shutdown(config.shutdown_timeout.0.as_millis() as u64);
        }
        return Err(e.to_string());
    }
    for name in changed {
        let index = loaded.iter().position(|(c, _)| c.name == *name);
        let replacement = index.map(|i| loaded.swap_remove(i));
        let what = match (&replacement, bus.consumer_names().contains(name)) {
            (Some(_), true) => "replaced",
            (Some(_), false) => "added",
            (None, _) => "removed",
        };
        bus.swap(name, replacement);
        tracing::info!("reload: consumer {name} {what}");
    }
    if config.log_level != running.log_level {
        log_level.set(&config.log_level);
    }
    for (key, changed) in [
        ("producer", config.producer != running.producer),
        ("telemetry", config.telemetry != running.telemetry),
        ("log_format", config.log_format != running.log_format),
        (
            "shutdown_timeout",
            config.shutdown_timeout != running.shutdown_timeout,
        ),
    ] {
        if changed {
            tracing::warn!("reload: {key} changed; it takes effect when the agent restarts");
        }
    }
    Ok(())
}
