//! Logging from a plugin into the router's own log (its format, its filter), through a
//! callback the router hands to the plugin's constructor. Use the macros:
//!
//! ```
//! plugin_api::info!("uploaded profile #{} ({} bytes)", 3, 1024);
//! plugin_api::warn!("retrying in {:?}", std::time::Duration::from_secs(2));
//! ```
//!
//! Each line is attributed to the consumer instance it comes from (its name in the
//! configuration: two `datadog` consumers log as `datadog` and `datadog-eu`): the router's
//! calls into the consumer carry that name, and so do threads started with [`spawn`].
//! Before the router has connected the plugin (in a unit test, say), lines go to stderr.

use std::{
    cell::RefCell,
    io,
    sync::{Arc, OnceLock},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

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
    /// Writes one line to the router's log, attributed to consumer `consumer` (its name in the
    /// configuration) of plugin `plugin`.
    pub log:
        extern "C" fn(level: LogLevel, plugin: RStr<'_>, consumer: RStr<'_>, message: RStr<'_>),
}

static HOST: OnceLock<(Host, &'static str)> = OnceLock::new();

thread_local! {
    /// The consumer this thread works for, when known.
    static CONSUMER: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Connects this plugin's log to the router (called by [`crate::export_consumer!`]).
pub fn connect(host: Host, plugin: &'static str) {
    let _ = HOST.set((host, plugin));
}

/// Writes one line at `level`; prefer the macros.
pub fn write(level: LogLevel, message: &str) {
    CONSUMER.with_borrow(|consumer| match HOST.get() {
        Some((host, plugin)) => (host.log)(
            level,
            RStr::from_str(plugin),
            RStr::from_str(consumer.as_deref().unwrap_or(plugin)),
            RStr::from_str(message),
        ),
        None => match consumer {
            Some(consumer) => eprintln!("{level:?} [{consumer}]: {message}"),
            None => eprintln!("{level:?}: {message}"),
        },
    })
}

/// Runs `f` with this thread's log lines attributed to `consumer` (the router's calls into a
/// consumer run this way).
pub fn as_consumer<T>(consumer: &Arc<str>, f: impl FnOnce() -> T) -> T {
    let before = CONSUMER.replace(Some(consumer.clone()));
    let result = f();
    CONSUMER.set(before);
    result
}

/// Starts thread `name`, whose log lines are attributed to the consumer of the thread that
/// starts it. Plugins start their threads with it (from [`crate::ConsumerPlugin::start`]).
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let consumer = CONSUMER.with_borrow(Clone::clone);
    thread::Builder::new().name(name.into()).spawn(move || {
        CONSUMER.set(consumer);
        f()
    })
}

/// Waits `timeout` at most for `thread` to end; an error names it when it has not.
pub fn join_within<T>(thread: JoinHandle<T>, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            let name = thread.thread().name().unwrap_or("(unnamed)").to_owned();
            return Err(format!("thread {name} still running after {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    let _ = thread.join();
    Ok(())
}

/// The consumer this thread works for (for runtimes that start threads of their own, such as
/// Tokio's `on_thread_start`; pair it with [`work_for`]).
pub fn current_consumer() -> Option<Arc<str>> {
    CONSUMER.with_borrow(Clone::clone)
}

/// Attributes this thread's log lines to `consumer` from now on.
pub fn work_for(consumer: Option<Arc<str>>) {
    CONSUMER.set(consumer);
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
