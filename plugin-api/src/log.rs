//! Logging from a plugin into the router's own log (its format, its filter), through a
//! callback the router hands to the plugin's constructor. Use the macros:
//!
//! ```
//! plugin_api::info!("uploaded profile #{} ({} bytes)", 3, 1024);
//! plugin_api::warn!("retrying in {:?}", std::time::Duration::from_secs(2));
//! ```
//!
//! Before the router has connected the plugin (in a unit test, say), lines go to stderr.

use std::sync::OnceLock;

use abi_stable::{std_types::RStr, StableAbi};

/// Severity of a log line.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something may need attention.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for debugging.
    Debug,
}

/// What the router offers a plugin: today, its log.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct Host {
    /// Writes one line to the router's log, attributed to `plugin`.
    pub log: extern "C" fn(level: LogLevel, plugin: RStr<'_>, message: RStr<'_>),
}

static HOST: OnceLock<(Host, &'static str)> = OnceLock::new();

/// Connects this plugin's log to the router (called by [`crate::export_consumer!`]).
pub fn connect(host: Host, plugin: &'static str) {
    let _ = HOST.set((host, plugin));
}

/// Writes one line at `level`; prefer the macros.
pub fn write(level: LogLevel, message: &str) {
    match HOST.get() {
        Some((host, plugin)) => (host.log)(level, RStr::from_str(plugin), RStr::from_str(message)),
        None => eprintln!("{level:?}: {message}"),
    }
}

/// Logs an error line to the router's log.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::LogLevel::Error, &format!($($arg)*)) };
}

/// Logs a warning line to the router's log.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write($crate::log::LogLevel::Warn, &format!($($arg)*)) };
}

/// Logs an info line to the router's log.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::LogLevel::Info, &format!($($arg)*)) };
}

/// Logs a debug line to the router's log.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::write($crate::log::LogLevel::Debug, &format!($($arg)*)) };
}
