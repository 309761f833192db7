//! The consumer: what a plugin implements ([`ConsumerPlugin`]) and the ABI-stable form the
//! router calls ([`ConsumerBox`]), with every call guarded against panics.

// `#[sabi_trait]` generates impl blocks inside a const item.
#![allow(non_local_definitions)]

use std::{
    fmt::Display,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
    time::Duration,
};

use abi_stable::{
    sabi_trait,
    std_types::{RBox, RErr, ROk, ROption, RResult, RString, RVec},
    StableAbi,
};

use crate::{log, model::ProfileBatch};

/// An error a plugin reports to the router: a message that names the thing and the value.
///
/// Any `Display` value converts into it, so `?` works on the usual error types. (Like
/// `anyhow::Error`, it does not implement `Display` itself; read the message with `.0`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError(pub String);

impl<E: Display> From<E> for PluginError {
    fn from(error: E) -> Self {
        PluginError(error.to_string())
    }
}

/// Whether a [`PluginMetric`] only grows or goes up and down.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only grows (uploads, bytes, failures).
    Counter,
    /// Goes up and down (queue depth, last latency).
    Gauge,
}

/// A number a plugin reports about itself; the router serves it on `/metrics` as
/// `router_plugin_<name>{consumer="..."}`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginMetric {
    /// Snake-case name, unit suffixed (`uploads`, `upload_bytes`, `upload_seconds`).
    pub name: RString,
    /// One line of help text.
    pub help: RString,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// The current value.
    pub value: f64,
}

impl PluginMetric {
    /// A counter.
    pub fn counter(name: &str, help: &str, value: f64) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            kind: MetricKind::Counter,
            value,
        }
    }

    /// A gauge.
    pub fn gauge(name: &str, help: &str, value: f64) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            kind: MetricKind::Gauge,
            value,
        }
    }
}

/// How a consumer's deliveries are going, as it reports them after each call
/// ([`ConsumerPlugin::health`]). The router decides from it whether the consumer is healthy
/// (`/healthz`): it is not while a thread of it has died, after a few failed attempts in a
/// row, or when nothing has been delivered for too long while something waits.
///
/// ```
/// use plugin_api::consumer::Health;
/// let fine = Health::default();
/// assert!(fine.problem.is_none() && fine.failed_attempts_in_a_row == 0);
/// let agent = Health::problem("the Agent takes no profiles");
/// assert_eq!(agent.problem.into_option().as_deref(), Some("the Agent takes no profiles"));
/// ```
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// What keeps the consumer from delivering, in one sentence (its backend lacks the
    /// endpoint, say); `RNone` when nothing does.
    pub problem: ROption<RString>,
    /// Delivery attempts (retried or refused) that failed since the last one that succeeded.
    pub failed_attempts_in_a_row: u64,
    /// Why the last failed attempt failed.
    pub last_error: ROption<RString>,
    /// How long something has waited for delivery with nothing delivered meanwhile, in
    /// milliseconds; 0 when nothing waits.
    pub undelivered_for_ms: u64,
    /// A thread of the consumer that died, and how (`thread otlp-export panicked: ...`).
    pub dead_thread: ROption<RString>,
}

impl Health {
    /// Healthy but for `problem`.
    pub fn problem(problem: impl Into<String>) -> Health {
        Health {
            problem: ROption::RSome(RString::from(problem.into())),
            ..Health::default()
        }
    }
}

/// What a consumer plugin implements. The router calls it from one thread of its own
/// (never concurrently), so a slow call delays only this consumer.
///
/// Its life: the constructor (given to [`crate::export_consumer!`]) only reads and checks the
/// settings, and starts nothing, so that `router --check` can validate a configuration
/// without side effects; [`ConsumerPlugin::start`] starts the threads, runtimes and
/// connections; `consume`/`flush` run; [`ConsumerPlugin::shutdown`] stops every thread that
/// `start` started. Threads started with [`crate::log::spawn`] log under the consumer's name.
///
/// ```
/// use plugin_api::{ConsumerPlugin, PluginError, ProfileBatch};
/// use std::time::Duration;
///
/// struct Count(u64);
/// impl ConsumerPlugin for Count {
///     fn name(&self) -> String { "count".into() }
///     fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError> {
///         self.0 += batch.total_events();
///         Ok(())
///     }
/// }
/// ```
pub trait ConsumerPlugin: Send + 'static {
    /// The consumer's name, as it appears in logs.
    fn name(&self) -> String;
    /// Starts what the consumer runs in the background (upload threads, runtimes). Called
    /// once, before the first `consume`; never called by a configuration check.
    fn start(&mut self) -> Result<(), PluginError> {
        Ok(())
    }
    /// Takes one batch. Keep it short: convert and buffer, upload on your own schedule.
    fn consume(&mut self, batch: &ProfileBatch) -> Result<(), PluginError>;
    /// Writes or sends everything buffered, within `timeout`.
    fn flush(&mut self, timeout: Duration) -> Result<(), PluginError> {
        let _ = timeout;
        Ok(())
    }
    /// Stops every thread the consumer started and releases its resources, within
    /// `timeout`; no call follows. Called after a final `flush`.
    fn shutdown(&mut self, timeout: Duration) -> Result<(), PluginError> {
        let _ = timeout;
        Ok(())
    }
    /// The plugin's own numbers (uploads, bytes, latency...), read after each call.
    fn metrics(&self) -> Vec<PluginMetric> {
        Vec::new()
    }

    /// How its deliveries are going (a [`crate::delivery::DeliveryQueue`] reports its own
    /// with [`crate::delivery::DeliveryQueue::health`]); the router asks after each call and
    /// about once a second while idle, and reports it on `/healthz`.
    fn health(&self) -> Health {
        Health::default()
    }
}

/// The ABI-stable consumer interface that crosses the plugin boundary.
///
/// Plugins do not implement this directly: [`crate::export_consumer!`] wraps a
/// [`ConsumerPlugin`] in [`PanicGuard`], which implements it.
#[sabi_trait]
pub trait Consumer: Send {
    /// The consumer's name.
    fn name(&self) -> RString;
    /// Takes one batch.
    fn consume(&mut self, batch: &ProfileBatch) -> RResult<(), RString>;
    /// Writes or sends everything buffered, within `timeout_ms`.
    fn flush(&mut self, timeout_ms: u64) -> RResult<(), RString>;
    /// Releases resources, within `timeout_ms`.
    fn shutdown(&mut self, timeout_ms: u64) -> RResult<(), RString>;
    /// The plugin's own numbers.
    #[sabi(last_prefix_field)]
    fn metrics(&self) -> RVec<PluginMetric>;

    /// See [`ConsumerPlugin::health`].
    fn health(&self) -> Health;
    /// See [`ConsumerPlugin::start`].
    fn start(&mut self) -> RResult<(), RString>;
}

/// A boxed consumer trait object, as returned by a plugin's constructor.
pub type ConsumerBox = Consumer_TO<'static, RBox<()>>;

/// Adapts a [`ConsumerPlugin`] to [`Consumer`], turning panics into errors, and attributes
/// the log lines of every call to the consumer's name in the configuration.
pub struct PanicGuard<C> {
    plugin: C,
    consumer: Arc<str>,
}

impl<C> PanicGuard<C> {
    /// Wraps `plugin`, the consumer named `consumer` in the configuration.
    pub fn new(plugin: C, consumer: Arc<str>) -> Self {
        Self { plugin, consumer }
    }

    fn call<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut C) -> Result<T, PluginError>,
    ) -> RResult<T, RString> {
        let Self { plugin, consumer } = self;
        log::as_consumer(consumer, || guard(what, || f(plugin)))
    }
}

/// Runs `f`, turning a panic into an error that says where it happened.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(error)) => RErr(RString::from(error.0)),
        Err(panic) => RErr(RString::from(format!(
            "plugin panicked in {what}: {}",
            panic_message(&*panic)
        ))),
    }
}

/// The message a panic was raised with.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

impl<C: ConsumerPlugin> Consumer for PanicGuard<C> {
    fn name(&self) -> RString {
        match catch_unwind(AssertUnwindSafe(|| self.plugin.name())) {
            Ok(name) => RString::from(name),
            Err(_) => RString::from("(panicked in name)"),
        }
    }

    fn consume(&mut self, batch: &ProfileBatch) -> RResult<(), RString> {
        self.call("consume", |c| c.consume(batch))
    }

    fn flush(&mut self, timeout_ms: u64) -> RResult<(), RString> {
        self.call("flush", |c| c.flush(Duration::from_millis(timeout_ms)))
    }

    fn shutdown(&mut self, timeout_ms: u64) -> RResult<(), RString> {
        self.call("shutdown", |c| {
            c.shutdown(Duration::from_millis(timeout_ms))
        })
    }

    fn metrics(&self) -> RVec<PluginMetric> {
        catch_unwind(AssertUnwindSafe(|| self.plugin.metrics()))
            .map(RVec::from)
            .unwrap_or_default()
    }

    fn start(&mut self) -> RResult<(), RString> {
        self.call("start", |c| c.start())
    }

    fn health(&self) -> Health {
        catch_unwind(AssertUnwindSafe(|| self.plugin.health())).unwrap_or_else(|panic| {
            Health::problem(format!(
                "plugin panicked in health: {}",
                panic_message(&*panic)
            ))
        })
    }
}
