//! Self-metrics and health over HTTP (`[telemetry] listen = "127.0.0.1:9464"`, off by default):
//! `/metrics` in the Prometheus/OpenMetrics text format (encoded by the `prometheus-client`
//! crate), `/healthz` 200 while the producer publishes and every consumer delivers, 503 with
//! the reason otherwise. The HTTP server, and its bounds, are in `telemetry/listener.rs`.

mod listener;

use std::{
    collections::BTreeMap,
    fs,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use plugin_api::{Health, LossCounters, MetricKind, ProfileBatch, UnwindOutcomes};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use listener::{serve, ListenerStats};

use crate::{
    bus::{Bus, ConsumerStats},
    symbolize::{perf_map::PerfMapStats, CacheStats, Unreadable},
    unwind_tables::TableStats,
};

/// What the producer side did, shared with the telemetry endpoint.
#[derive(Default, Debug)]
pub struct ProducerStats {
    /// Whether the producer is running.
    running: AtomicBool,
    /// The producer's interval, the longest it goes between two batches when all is well.
    interval: Mutex<Duration>,
    /// When the last batch was published, or the producer started if none was yet.
    last_published: Mutex<Option<Instant>>,
    /// Samples published.
    pub samples: AtomicU64,
    /// Batches published.
    pub batches: AtomicU64,
    /// Samples lost because the ring buffer was full.
    pub lost_ring_buffer_full: AtomicU64,
    /// Stacks (user or kernel) the kernel could not read; their samples are kept.
    pub lost_stack_unreadable: AtomicU64,
    /// User stacks left out, one per sample, because their process had exited before its
    /// mappings were read; the samples are kept.
    pub lost_process_exited: AtomicU64,
    /// User stacks left out, one per sample, because their running process could not be read.
    pub lost_process_unreadable: AtomicU64,
    /// The symbolizer's counters and cache size, as of the last interval.
    pub symbolizer: Mutex<CacheStats>,
    /// The perf map reader's counters, as of the last interval.
    pub perf_maps: Mutex<PerfMapStats>,
    /// User stacks by how they were walked and ended, since the start.
    pub unwind_outcomes: Mutex<UnwindOutcomes>,
    /// The unwind-table manager's counters.
    pub unwind_tables: Arc<TableStats>,
}

impl ProducerStats {
    /// Marks the producer running, publishing a batch every `interval`.
    pub fn started(&self, interval: Duration) {
        *self.interval.lock().unwrap() = interval;
        *self.last_published.lock().unwrap() = Some(Instant::now());
        self.running.store(true, Relaxed);
    }

    /// Marks the producer stopped.
    pub fn stopped(&self) {
        self.running.store(false, Relaxed);
    }

    /// Counts a batch about to be published.
    pub fn count_batch(&self, batch: &ProfileBatch) {
        *self.last_published.lock().unwrap() = Some(Instant::now());
        self.batches.fetch_add(1, Relaxed);
        self.samples.fetch_add(batch.samples.len() as u64, Relaxed);
        let LossCounters {
            ring_buffer_full,
            stack_unreadable,
            process_exited,
            process_unreadable,
            unwind,
        } = &batch.lost;
        self.lost_ring_buffer_full
            .fetch_add(*ring_buffer_full, Relaxed);
        self.lost_stack_unreadable
            .fetch_add(*stack_unreadable, Relaxed);
        self.lost_process_exited.fetch_add(*process_exited, Relaxed);
        self.lost_process_unreadable
            .fetch_add(*process_unreadable, Relaxed);
        self.unwind_outcomes.lock().unwrap().add(unwind);
    }
}

/// Everything the endpoint reports on.
#[derive(Clone)]
pub struct Telemetry {
    /// The producer's counters.
    pub producer: Arc<ProducerStats>,
    /// The bus, for each consumer's counters (the set changes when the configuration is
    /// reloaded).
    pub consumers: Arc<Bus>,
    /// `[telemetry] stale_after`: how long a consumer may go without delivering what waits,
    /// or without returning from a call.
    pub stale_after: Duration,
    /// The HTTP listener's counters.
    pub listener: Arc<ListenerStats>,
}

type Labels = Vec<(String, String)>;

impl Telemetry {
    /// The metrics in the OpenMetrics text format.
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::with_prefix("router");
        let p = &self.producer;
        for (name, help, value) in [
            (
                "samples_collected",
                "Samples published to the consumers",
                &p.samples,
            ),
            (
                "batches_published",
                "Batches published to the consumers",
                &p.batches,
            ),
        ] {
            let counter = Counter::<u64>::default();
            counter.inc_by(value.load(Relaxed));
            registry.register(name, help, counter);
        }
        register_symbolizer_metrics(&mut registry, &p.symbolizer.lock().unwrap());
        register_perf_map_metrics(&mut registry, &p.perf_maps.lock().unwrap());
        let log_lines_lost = Counter::<u64>::default();
        log_lines_lost.inc_by(crate::logging::lines_lost());
        registry.register(
            "log_lines_lost",
            "Log lines that could not be written to stderr",
            log_lines_lost,
        );
        let sanitized = Family::<Labels, Counter>::default();
        for (field, count) in crate::process::sanitized_counts() {
            sanitized
                .get_or_create(&vec![("field".into(), field.name().into())])
                .inc_by(count);
        }
        registry.register(
            "process_values_sanitized",
            "Values read from processes (service, env, version, comm) that were capped or had characters replaced",
            sanitized,
        );
        let samples_lost = Family::<Labels, Counter>::default();
        samples_lost
            .get_or_create(&vec![("cause".into(), "ring_buffer_full".into())])
            .inc_by(p.lost_ring_buffer_full.load(Relaxed));
        registry.register("samples_lost", "Samples lost whole, by cause", samples_lost);
        let stacks_lost = Family::<Labels, Counter>::default();
        for (cause, value) in [
            ("stack_unreadable", &p.lost_stack_unreadable),
            ("process_exited", &p.lost_process_exited),
            ("process_unreadable", &p.lost_process_unreadable),
        ] {
            stacks_lost
                .get_or_create(&vec![("cause".into(), cause.into())])
                .inc_by(value.load(Relaxed));
        }
        registry.register(
            "stacks_lost",
            "Stacks left out of samples that were kept, by cause",
            stacks_lost,
        );
        let outcomes = Family::<Labels, Counter>::default();
        for (outcome, value) in p.unwind_outcomes.lock().unwrap().named() {
            outcomes
                .get_or_create(&vec![("outcome".into(), outcome.into())])
                .inc_by(value);
        }
        registry.register(
            "user_stacks",
            "User stacks by how they were walked and why the walk ended",
            outcomes,
        );
        let t = &p.unwind_tables;
        for (name, help, value) in [
            (
                "unwind_tables_loaded",
                "Unwind tables loaded into the probe",
                t.tables.load(Relaxed),
            ),
            (
                "unwind_table_rows",
                "Rows of the probe's unwind-table array in use",
                t.rows_used.load(Relaxed),
            ),
            (
                "unwind_table_rows_capacity",
                "Rows the probe's unwind-table array holds (the budget)",
                t.rows_capacity.load(Relaxed),
            ),
            (
                "unwind_processes",
                "Processes whose mappings the probe's unwinder knows",
                t.processes.load(Relaxed),
            ),
            (
                "unwind_map_bytes",
                "Kernel memory of the unwinder's maps",
                t.map_bytes(),
            ),
        ] {
            let gauge = Gauge::<i64>::default();
            gauge.set(value as i64);
            registry.register(name, help, gauge);
        }
        for (name, help, value) in [
            (
                "unwind_table_evictions",
                "Unwind tables evicted to stay within the budget",
                &t.evictions,
            ),
            (
                "unwind_table_failures",
                "Files whose unwind table could not be built or did not fit",
                &t.failures,
            ),
            (
                "unwind_table_build_microseconds",
                "Time spent building unwind tables",
                &t.build_micros,
            ),
        ] {
            let counter = Counter::<u64>::default();
            counter.inc_by(value.load(Relaxed));
            registry.register(name, help, counter);
        }

        let per_consumer = |pick: fn(&ConsumerStats) -> u64| {
            let family = Family::<Labels, Counter>::default();
            for (name, stats) in &self.consumers.stats() {
                family
                    .get_or_create(&vec![("consumer".into(), name.clone())])
                    .inc_by(pick(stats));
            }
            family
        };
        registry.register(
            "consumer_batches_received",
            "Batches published to the consumer",
            per_consumer(|s| s.received.load(Relaxed)),
        );
        registry.register(
            "consumer_batches_delivered",
            "Batches the consumer took without error",
            per_consumer(|s| s.delivered.load(Relaxed)),
        );
        registry.register(
            "consumer_batches_dropped",
            "Batches dropped because the consumer's queue was full",
            per_consumer(|s| s.dropped.load(Relaxed)),
        );
        registry.register(
            "consumer_calls_failed",
            "The router's calls into the consumer (consume, flush, shutdown) that failed or panicked; a plugin's own delivery attempts are counted by the plugin (router_plugin_retries, router_plugin_rejected_*)",
            per_consumer(|s| s.failed.load(Relaxed)),
        );
        let depth = Family::<Labels, Gauge>::default();
        for (name, stats) in &self.consumers.stats() {
            depth
                .get_or_create(&vec![("consumer".into(), name.clone())])
                .set(stats.queued.load(Relaxed) as i64);
        }
        registry.register(
            "consumer_queue_depth",
            "Batches waiting in the consumer's queue",
            depth,
        );

        self.register_plugin_metrics(&mut registry);
        self.listener.register(&mut registry);

        let (rss, cpu) = process_usage();
        let rss_gauge = Gauge::<i64>::default();
        rss_gauge.set(rss as i64);
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the router process",
            rss_gauge,
        );
        let cpu_counter = Counter::<f64, AtomicU64>::default();
        cpu_counter.inc_by(cpu);
        registry.register(
            "process_cpu_seconds",
            "CPU time of the router process (user + system)",
            cpu_counter,
        );

        let mut text = String::new();
        encode(&mut text, &registry).expect("encoding into a String cannot fail");
        text
    }

    /// The plugins' own numbers, as `router_plugin_<name>{consumer="..."}`.
    fn register_plugin_metrics(&self, registry: &mut Registry) {
        type FloatCounter = Counter<f64, AtomicU64>;
        type FloatGauge = Gauge<f64, AtomicU64>;
        /// Help, kind and the value per consumer of one plugin metric.
        type Series = (String, MetricKind, Vec<(String, f64)>);
        let mut by_name: BTreeMap<String, Series> = BTreeMap::new();
        for (consumer, stats) in &self.consumers.stats() {
            for m in stats.plugin_metrics.lock().unwrap().iter() {
                by_name
                    .entry(format!("plugin_{}", m.name))
                    .or_insert_with(|| (m.help.to_string(), m.kind, Vec::new()))
                    .2
                    .push((consumer.clone(), m.value));
            }
        }
        for (name, (help, kind, values)) in by_name {
            let labels = |consumer: &str| vec![("consumer".to_owned(), consumer.to_owned())];
            match kind {
                MetricKind::Counter => {
                    let family = Family::<Labels, FloatCounter>::default();
                    for (consumer, value) in values {
                        family.get_or_create(&labels(&consumer)).inc_by(value);
                    }
                    registry.register(name, help, family);
                }
                MetricKind::Gauge => {
                    let family = Family::<Labels, FloatGauge>::default();
                    for (consumer, value) in values {
                        family.get_or_create(&labels(&consumer)).set(value);
                    }
                    registry.register(name, help, family);
                }
            }
        }
    }

    /// `None` when healthy, else why not.
    pub fn unhealthy_reason(&self) -> Option<String> {
        let mut reasons = Vec::new();
        let p = &self.producer;
        if !p.running.load(Relaxed) {
            reasons.push("producer not running".to_owned());
        } else if let Some(last) = *p.last_published.lock().unwrap() {
            reasons.extend(producer_problem(
                last.elapsed(),
                *p.interval.lock().unwrap(),
            ));
        }
        for (name, stats) in &self.consumers.stats() {
            if let Some(reason) = consumer_problem(stats, self.stale_after) {
                reasons.push(format!("consumer {name}{reason}"));
            }
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// Intervals a running producer may go without publishing before it is unhealthy.
pub const PRODUCER_STALLED_AFTER_INTERVALS: u32 = 3;
/// The least time a running producer may go without publishing before it is unhealthy: its
/// first interval also symbolizes every process once, and a replay at speed 0 has intervals
/// of no length.
pub const PRODUCER_STALLED_AFTER_AT_LEAST: Duration = Duration::from_secs(10);

/// Why a running producer is unhealthy, or `None`: it has published nothing for
/// `since_published` (since its last batch, or since it started), longer than
/// [`PRODUCER_STALLED_AFTER_INTERVALS`] of its `interval` and than
/// [`PRODUCER_STALLED_AFTER_AT_LEAST`].
fn producer_problem(since_published: Duration, interval: Duration) -> Option<String> {
    let allowed =
        (interval * PRODUCER_STALLED_AFTER_INTERVALS).max(PRODUCER_STALLED_AFTER_AT_LEAST);
    (since_published > allowed).then(|| {
        format!(
            "producer: no interval published for {:.0?} (interval {interval:?}, allowed {allowed:?})",
            since_published
        )
    })
}

/// Failed delivery attempts in a row that make a consumer unhealthy.
pub const FAILED_ATTEMPTS_UNHEALTHY: u64 = 3;

/// Why a consumer is unhealthy (the text that follows its name), or `None`: its thread
/// stopped; its last call failed; a thread of the plugin died; a call has not returned for
/// `stale_after`; its last [`FAILED_ATTEMPTS_UNHEALTHY`] delivery attempts failed; something
/// has waited `stale_after` with nothing delivered; or the plugin names a problem.
fn consumer_problem(stats: &ConsumerStats, stale_after: Duration) -> Option<String> {
    if stats.finished.load(Relaxed) {
        return Some(" stopped".into());
    }
    if stats.last_call_failed.load(Relaxed) {
        let error = stats.last_error.lock().unwrap().clone().unwrap_or_default();
        return Some(format!(" failing: {error}"));
    }
    let stale = |d: Duration| format!("{:.0?} (stale_after {stale_after:?})", d);
    if let Some((call, since)) = *stats.call_in_progress.lock().unwrap() {
        if since.elapsed() > stale_after {
            return Some(format!(
                ": its {call} call has not returned for {}",
                stale(since.elapsed())
            ));
        }
    }
    let report = stats.plugin_health.lock().unwrap().clone()?;
    let Health {
        problem,
        failed_attempts_in_a_row: failures,
        last_error,
        undelivered_for_ms,
        dead_thread,
    } = report.health;
    let last_error = last_error.map_or_else(|| "none given".into(), String::from);
    let undelivered_for = (undelivered_for_ms > 0)
        .then(|| Duration::from_millis(undelivered_for_ms) + report.taken.elapsed());
    if let Some(death) = dead_thread.into_option() {
        Some(format!(": {death}"))
    } else if failures >= FAILED_ATTEMPTS_UNHEALTHY {
        Some(format!(
            ": its last {failures} delivery attempts failed, the last with: {last_error}"
        ))
    } else if let Some(waited) = undelivered_for.filter(|d| *d > stale_after) {
        Some(format!(
            ": nothing delivered for {} while data waits (last error: {last_error})",
            stale(waited)
        ))
    } else {
        problem.into_option().map(|problem| format!(": {problem}"))
    }
}

/// The symbolizer's counters, its cache's size, and the files it could not read by reason.
fn register_symbolizer_metrics(registry: &mut Registry, stats: &CacheStats) {
    for (name, help, value) in [
        (
            "symbol_cache_hits",
            "Symbolization lookups answered from the cache",
            stats.hits,
        ),
        (
            "symbol_cache_misses",
            "Symbolization lookups that went to the symbolizer",
            stats.misses,
        ),
        (
            "symbol_cache_evictions",
            "Symbolization answers dropped, least recently used first, to stay within the cache's bounds",
            stats.evicted,
        ),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }
    for (name, help, value) in [
        (
            "symbol_cache_entries",
            "Symbolization answers cached",
            stats.entries,
        ),
        (
            "symbol_cache_bytes",
            "Estimated heap bytes of the symbolization answers cached",
            stats.bytes,
        ),
        (
            "symbol_files_open",
            "ELF files the symbolizer holds open and parsed",
            stats.open_files,
        ),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(value as i64);
        registry.register(name, help, gauge);
    }
    let unreadable = Family::<Labels, Counter>::default();
    for reason in Unreadable::ALL {
        unreadable
            .get_or_create(&vec![("reason".into(), reason.name().into())])
            .inc_by(stats.unreadable(reason));
    }
    registry.register(
        "symbol_files_unreadable",
        "Attempts to open a process's mapped file for symbols that failed, by reason",
        unreadable,
    );
}

/// The perf map reader's counters.
fn register_perf_map_metrics(registry: &mut Registry, stats: &PerfMapStats) {
    for (name, help, value) in [
        ("perf_map_reads", "Perf map files opened and read", stats.reads),
        (
            "perf_map_files_refused",
            "Perf map files not read: a symlink, not a regular file, on FUSE, or not owned by the process's user",
            stats.refused,
        ),
        (
            "perf_map_lines_malformed",
            "Perf map lines skipped as malformed or too long",
            stats.malformed,
        ),
        (
            "perf_map_entries_dropped",
            "Perf map entries not kept: their process was at its entry limit or the byte budget",
            stats.dropped,
        ),
        (
            "perf_map_processes_evicted",
            "Processes whose perf map entries were dropped for the byte budget",
            stats.evicted,
        ),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }
}

/// Resident bytes and CPU seconds of this process, from /proc/self.
fn process_usage() -> (u64, f64) {
    let page = 4096u64;
    let rss = fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some(
                (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
                    / ticks,
            )
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use abi_stable::std_types::{ROption, RString};

    use super::*;
    use crate::bus::HealthReport;

    const STALE_AFTER: Duration = Duration::from_secs(60);

    /// A consumer whose plugin reported `health` just now.
    fn reporting(health: Health) -> ConsumerStats {
        let stats = ConsumerStats::default();
        *stats.plugin_health.lock().unwrap() = Some(HealthReport {
            health,
            taken: Instant::now(),
        });
        stats
    }

    fn text(s: &str) -> ROption<RString> {
        ROption::RSome(s.into())
    }

    #[test]
    fn a_producer_is_unhealthy_after_three_intervals_without_a_batch_but_never_within_ten_seconds()
    {
        let (s, ms) = (Duration::from_secs, Duration::from_millis);
        assert_eq!(producer_problem(s(29), s(10)), None);
        assert_eq!(
            producer_problem(s(45), s(10)).as_deref(),
            Some("producer: no interval published for 45s (interval 10s, allowed 30s)")
        );
        // A replay's short intervals, a first interval, a replay at speed 0.
        assert_eq!(producer_problem(s(9), ms(200)), None);
        assert_eq!(producer_problem(s(9), Duration::ZERO), None);
        assert_eq!(
            producer_problem(ms(10_400), ms(200)).as_deref(),
            Some("producer: no interval published for 10s (interval 200ms, allowed 10s)")
        );
    }

    #[test]
    fn a_consumer_is_unhealthy_after_three_failed_attempts_and_names_the_last_error() {
        let failing = |failures| Health {
            failed_attempts_in_a_row: failures,
            last_error: text("HTTP 503 Service Unavailable"),
            undelivered_for_ms: 5_000,
            ..Health::default()
        };
        assert_eq!(consumer_problem(&reporting(failing(2)), STALE_AFTER), None);
        assert_eq!(
            consumer_problem(&reporting(failing(3)), STALE_AFTER).as_deref(),
            Some(
                ": its last 3 delivery attempts failed, the last with: HTTP 503 Service Unavailable"
            )
        );
        assert_eq!(
            consumer_problem(&reporting(Health::default()), STALE_AFTER),
            None
        );
    }

    #[test]
    fn a_consumer_is_unhealthy_when_data_waits_undelivered_past_stale_after() {
        let waiting = |ms| Health {
            undelivered_for_ms: ms,
            ..Health::default()
        };
        assert_eq!(
            consumer_problem(&reporting(waiting(59_000)), STALE_AFTER),
            None
        );
        let problem = consumer_problem(&reporting(waiting(61_000)), STALE_AFTER).unwrap();
        assert!(
            problem.starts_with(": nothing delivered for 61s (stale_after 60s) while data waits"),
            "{problem}"
        );
    }

    #[test]
    fn a_dead_thread_or_a_call_that_never_returns_makes_a_consumer_unhealthy() {
        let dead = reporting(Health {
            dead_thread: text("thread otlp-export panicked: boom"),
            ..Health::default()
        });
        assert_eq!(
            consumer_problem(&dead, STALE_AFTER).as_deref(),
            Some(": thread otlp-export panicked: boom")
        );
        let stuck = reporting(Health::default());
        *stuck.call_in_progress.lock().unwrap() =
            Some(("consume", Instant::now() - Duration::from_secs(61)));
        let problem = consumer_problem(&stuck, STALE_AFTER).unwrap();
        assert!(
            problem.starts_with(": its consume call has not returned for 61s"),
            "{problem}"
        );
    }
}
