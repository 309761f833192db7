//! The configuration schema and its built-in defaults.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{HumanBytes, HumanDuration};

/// The whole configuration of the router.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Log filter (`info`, `debug`, `router=debug,warn`); `RUST_LOG` wins when set.
    pub log_level: String,
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// Folder that relative plugin paths are resolved against; default: the router binary's folder.
    pub plugin_dir: Option<PathBuf>,
    /// Default capacity of each consumer's queue, in batches.
    pub queue_capacity: usize,
    /// How long shutdown waits for consumers to deliver, flush and shut down.
    pub shutdown_timeout: HumanDuration,
    /// The producer of profiles.
    pub producer: ProducerConfig,
    /// The consumers, by name.
    pub consumers: BTreeMap<String, ConsumerEntry>,
    /// Self-metrics and health endpoint.
    pub telemetry: TelemetryConfig,
}

/// The self-metrics HTTP listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address to serve `/metrics` and `/healthz` on, e.g. "127.0.0.1:9464"; unset: off.
    pub listen: Option<std::net::SocketAddr>,
    /// A consumer that has had something to deliver for this long with nothing delivered, or
    /// whose call has not returned for this long, is unhealthy.
    pub stale_after: HumanDuration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            listen: None,
            stale_after: HumanDuration(Duration::from_secs(60)),
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: LogFormat::Human,
            plugin_dir: None,
            queue_capacity: 100,
            shutdown_timeout: HumanDuration(Duration::from_secs(10)),
            producer: ProducerConfig::default(),
            consumers: BTreeMap::new(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Which producer runs and how it samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// `ebpf` (sample this host) or `replay` (publish recorded batches).
    pub kind: ProducerKind,
    /// Length of one collection interval: one batch per interval.
    pub interval: HumanDuration,
    /// Samples per second per CPU (1 to 10 000).
    pub frequency_hz: u32,
    /// `cpu-clock` (software, works everywhere) or `cpu-cycles` (hardware PMU).
    pub event: SampledEvent,
    /// Record kernel stacks too.
    pub include_kernel: bool,
    /// Keep samples of the idle task (pid 0).
    pub include_idle: bool,
    /// Only these processes (empty: all).
    pub pids: Vec<u32>,
    /// Only processes with these command names (empty: all).
    pub comms: Vec<String>,
    /// Only processes in these cgroup v2 paths (empty: all).
    pub cgroups: Vec<String>,
    /// Deepest stack recorded, in frames (1 to `probe_common::MAX_STACK_DEPTH`, 127).
    pub max_stack_depth: u32,
    /// How user stacks are walked: `dwarf` (the executables' `.eh_frame` unwind tables,
    /// frame pointers where a file has none) or `frame-pointer` (cheaper, wrong for code
    /// built without frame pointers).
    pub unwinder: Unwinder,
    /// Kernel memory for unwind tables (least recently used tables are evicted beyond it).
    pub unwind_table_budget: HumanBytes,
    /// Whether the probe walks CPython's frames (3.11 to 3.13) into the stacks of Python
    /// processes (with `unwinder = "dwarf"`).
    pub python_frames: bool,
    /// Whether native frames carry source files and lines from the DWARF of the binaries that
    /// have it (their names come from the symbol tables either way); DWARF line programs cost
    /// the agent megabytes per binary.
    pub native_lines: bool,
    /// The host's name in every batch; unset: `DD_HOSTNAME`, else `NODE_NAME` (a Kubernetes
    /// DaemonSet sets it from `spec.nodeName`), else the kernel's host name (in a pod, the
    /// pod's name).
    pub hostname: Option<String>,
    /// How each process's service is found.
    pub services: ServicesConfig,
    /// Settings of the replay producer.
    pub replay: ReplayConfig,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            kind: ProducerKind::Ebpf,
            interval: HumanDuration(Duration::from_secs(10)),
            frequency_hz: 99,
            event: SampledEvent::CpuClock,
            include_kernel: true,
            include_idle: false,
            pids: Vec::new(),
            comms: Vec::new(),
            cgroups: Vec::new(),
            max_stack_depth: probe_common::MAX_STACK_DEPTH as u32,
            unwinder: Unwinder::Dwarf,
            unwind_table_budget: HumanBytes(32 << 20),
            python_frames: true,
            native_lines: false,
            hostname: None,
            services: ServicesConfig::default(),
            replay: ReplayConfig::default(),
        }
    }
}

/// The kinds of producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProducerKind {
    /// eBPF CPU sampling of this host.
    Ebpf,
    /// Batches read back from a recording (`router --record`).
    Replay,
}

/// How each process's service is found: its own environment (`DD_SERVICE`, then
/// `OTEL_SERVICE_NAME`), else the first matching rule, else its executable's name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// Infer a service per process; `false`: none (consumers use their configured service).
    pub infer: bool,
    /// Services for processes that set none, first match wins.
    pub rules: Vec<ServiceRule>,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            infer: true,
            rules: Vec::new(),
        }
    }
}

/// A service for the processes that match every matcher given (at least one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRule {
    /// The service name.
    pub service: String,
    /// A regular expression the command name must match (whole).
    #[serde(default)]
    pub comm: Option<String>,
    /// A regular expression the executable's path must match (whole).
    #[serde(default)]
    pub exe: Option<String>,
    /// The container id, or a prefix of it.
    #[serde(default)]
    pub container_id: Option<String>,
}

/// How the probe walks user stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unwinder {
    /// CFI (`.eh_frame`) unwind tables loaded into the probe; frame pointers where none.
    Dwarf,
    /// Frame pointers only.
    FramePointer,
}

/// The perf event that drives sampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SampledEvent {
    /// Software CPU clock.
    CpuClock,
    /// Hardware CPU cycles; falls back to `cpu-clock` without a PMU.
    CpuCycles,
}

/// Settings of the replay producer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// The recording to read (one JSON batch per line).
    pub path: Option<PathBuf>,
    /// Publish each batch after its recorded duration divided by `speed`;
    /// 0 publishes as fast as the bus takes them.
    pub speed: f64,
    /// How many times to play the recording (at least 1).
    pub repeat: u32,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            path: None,
            speed: 0.0,
            repeat: 1,
        }
    }
}

/// One consumer: the router's own keys; every other key is the plugin's and is handed to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsumerEntry {
    /// The plugin file: absolute, or relative to `plugin_dir`.
    /// Default for the built-in consumers: `libconsumer_<name>.so`.
    #[serde(default)]
    pub plugin: Option<PathBuf>,
    /// Whether this consumer runs.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Capacity of this consumer's queue, in batches (default: the top-level `queue_capacity`).
    #[serde(default)]
    pub queue_capacity: Option<usize>,
    /// The plugin's own settings.
    #[serde(flatten)]
    pub settings: toml::Table,
}

fn enabled_by_default() -> bool {
    true
}

/// The consumers that ship with the router; their plugin file defaults by name.
pub const BUILT_IN_CONSUMERS: [&str; 3] = ["datadog", "otlp", "perfdata"];

impl ConsumerEntry {
    /// The plugin file of consumer `name`, before resolving it against `plugin_dir`.
    pub fn plugin_file(&self, name: &str) -> Option<PathBuf> {
        self.plugin.clone().or_else(|| {
            BUILT_IN_CONSUMERS
                .contains(&name)
                .then(|| PathBuf::from(format!("libconsumer_{name}.so")))
        })
    }

    /// The plugin's own settings as TOML text, as handed to its constructor.
    pub fn settings_toml(&self) -> String {
        toml::to_string(&self.settings).unwrap_or_default()
    }
}
