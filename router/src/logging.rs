//! Logging setup: human-readable lines by default, JSON with `log_format = "json"`;
//! `RUST_LOG` overrides `log_level`. Log lines go to stderr; when stderr cannot be written (a
//! closed pipe, a full disk) the line is lost and counted, and the agent carries on.

use std::{
    io::{self, IsTerminal, Write},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use router_config::LogFormat;
use tracing_subscriber::{
    fmt::MakeWriter, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Layer,
    Registry,
};

/// Log lines that could not be written to stderr.
static LINES_LOST: AtomicU64 = AtomicU64::new(0);

/// How many log lines could not be written (stderr closed or failing).
pub fn lines_lost() -> u64 {
    LINES_LOST.load(Relaxed)
}

/// Changes the log filter of the running agent (a reloaded `log_level`).
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

impl LogLevel {
    /// Applies `level`, unless `RUST_LOG` set the filter (it wins, as at start).
    pub fn set(&self, level: &str) {
        if self.from_env {
            tracing::warn!("log_level changed but RUST_LOG is set: it stays in force");
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                if self.handle.reload(filter).is_ok() {
                    tracing::info!(log_level = level, "log level changed");
                }
            }
            Err(e) => tracing::error!(log_level = level, "log level not changed: {e}"),
        }
    }
}

/// Installs the global subscriber, writing to stderr.
pub fn init(level: &str, format: LogFormat) -> LogLevel {
    let from_env = EnvFilter::try_from_default_env().ok();
    let set_by_env = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(io::stderr().is_terminal())
        .with_writer(Stderr);
    let lines = match format {
        LogFormat::Human => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .init();
    LogLevel {
        handle,
        from_env: set_by_env,
    }
}

/// Stderr that never fails: a line it cannot take is counted in [`lines_lost`].
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if io::stderr().write_all(line).is_err() {
            LINES_LOST.fetch_add(1, Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for Stderr {
    type Writer = Stderr;

    fn make_writer(&self) -> Stderr {
        Stderr
    }
}
