//! Logging setup: human-readable lines by default, JSON with `log_format = "json"`;
//! `RUST_LOG` overrides `log_level`.

use std::io::IsTerminal;

use router_config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stderr.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
