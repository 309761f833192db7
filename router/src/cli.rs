//! The command line: flags, and how the seed's flags map onto configuration keys.

use std::path::PathBuf;

use clap::Parser;
use router_config::FlagOverrides;

/// Continuous CPU profiler for Linux that fans profiles out to consumer plugins
/// (Datadog, OTLP, perf.data, your own).
#[derive(Parser, Debug, Default)]
#[command(name = "router", version)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the merged configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Validate the configuration, load every plugin and check the producer, then exit.
    #[arg(long)]
    pub check: bool,
    /// Also write every published batch to FILE (one JSON batch per line), for replay.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Replay the batches of a recording instead of sampling this host.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace (RUST_LOG wins when set).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format: human or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Length of one collection interval, e.g. "10s".
    #[arg(long, value_name = "DURATION")]
    pub profiling_interval: Option<String>,
    /// Run the Datadog consumer.
    #[arg(long)]
    pub enable_profiling_datadog: bool,
    /// Datadog service name.
    #[arg(long, value_name = "NAME")]
    pub profiling_datadog_service: Option<String>,
    /// Datadog environment.
    #[arg(long, value_name = "ENV")]
    pub profiling_datadog_env: Option<String>,
    /// Datadog Agent profiling URL.
    #[arg(long, value_name = "URL")]
    pub profiling_datadog_agent: Option<String>,
    /// Run the OTLP consumer.
    #[arg(long)]
    pub enable_profiling_otlp: bool,
    /// OTLP endpoint.
    #[arg(long, value_name = "URL")]
    pub profiling_otlp_endpoint: Option<String>,
    /// Run the perf.data consumer.
    #[arg(long)]
    pub enable_profiling_perfdata: bool,
    /// Folder the perf.data consumer writes to.
    #[arg(long, value_name = "DIR")]
    pub profiling_perfdata_path: Option<String>,
}

impl Cli {
    /// The configuration keys that these flags set.
    pub fn overrides(&self) -> FlagOverrides {
        let mut flags = FlagOverrides::default();
        let strings = [
            ("log_level", &self.log_level),
            ("log_format", &self.log_format),
            ("producer.interval", &self.profiling_interval),
            ("consumers.datadog.service", &self.profiling_datadog_service),
            ("consumers.datadog.env", &self.profiling_datadog_env),
            ("consumers.datadog.agent_url", &self.profiling_datadog_agent),
            ("consumers.otlp.endpoint", &self.profiling_otlp_endpoint),
            ("consumers.perfdata.path", &self.profiling_perfdata_path),
        ];
        for (key, value) in strings {
            if let Some(value) = value {
                flags.set(key, value.as_str());
            }
        }
        let switches = [
            ("consumers.datadog.enabled", self.enable_profiling_datadog),
            ("consumers.otlp.enabled", self.enable_profiling_otlp),
            ("consumers.perfdata.enabled", self.enable_profiling_perfdata),
        ];
        for (key, on) in switches {
            if on {
                flags.set(key, true);
            }
        }
        if let Some(path) = &self.replay {
            flags.set("producer.kind", "replay");
            flags.set("producer.replay.path", path.display().to_string());
        }
        flags
    }
}
