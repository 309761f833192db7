//! The eBPF producer: samples every CPU with a perf_event program, drains its ring buffer on a
//! thread of its own, and every interval symbolizes and publishes one batch.

mod assemble;
pub mod host;
mod privileges;
mod probe;
#[cfg(test)]
mod record_properties;

use std::{
    collections::HashSet,
    mem,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use plugin_api::{LossCounters, ProfileBatch, UnwindOutcomes};
use probe_common::{unwind::outcome, SampleHeader};
use router_config::ProducerConfig;

use self::{
    assemble::{Assembler, RawSample},
    host::HostFacts,
    probe::Probe,
};
use super::Producer;
use crate::{
    process::Registry, shutdown::StopSignal, telemetry::ProducerStats, unwind_tables::TableManager,
};

/// Samples collected by the reader thread since the last batch.
struct Collected {
    samples: Vec<RawSample>,
    processes: Registry,
    /// The probe's loss counters at the last drain (cumulative).
    losses: LossCounters,
}

/// The eBPF CPU sampling producer.
pub struct EbpfProducer {
    config: ProducerConfig,
    probe: Option<Probe>,
    clock: WallClock,
    stats: Arc<ProducerStats>,
}

impl EbpfProducer {
    /// Checks privileges, loads the probe and attaches it to every CPU.
    pub fn start(config: &ProducerConfig, stats: Arc<ProducerStats>) -> anyhow::Result<Self> {
        privileges::check().map_err(anyhow::Error::msg)?;
        let probe = Probe::start(config)?;
        tracing::info!(
            event = probe.event,
            cpus = probe.cpus,
            frequency_hz = config.frequency_hz,
            "eBPF probe attached"
        );
        Ok(Self {
            config: config.clone(),
            probe: Some(probe),
            clock: WallClock::new(),
            stats,
        })
    }
}

impl Producer for EbpfProducer {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn interval(&self) -> Duration {
        self.config.interval.0
    }

    fn run(
        &mut self,
        publish: &mut dyn FnMut(ProfileBatch),
        stop: &StopSignal,
    ) -> anyhow::Result<()> {
        let mut probe = self.probe.take().expect("run is called once");
        let mut assembler = Assembler::new(
            &self.config,
            probe.event,
            HostFacts::read(probe.cpus, self.config.hostname.as_deref()),
        );
        // The unwind-table manager follows the registry on a thread of its own; it stops
        // when the registry (and every clone of it) is gone.
        let watcher = match probe.unwind_maps.take() {
            Some(maps) => {
                let (updates, received) = mpsc::channel();
                let capacity = maps.capacity();
                // No table may take more than a quarter of the budget.
                let manager = TableManager::new(
                    maps,
                    capacity,
                    capacity / 4,
                    self.stats.unwind_tables.clone(),
                )
                .with_python_frames(self.config.python_frames);
                thread::Builder::new()
                    .name("unwind-tables".into())
                    .spawn(move || manager.run(received))?;
                Some(updates)
            }
            None => None,
        };
        let collected = Arc::new(Mutex::new(Collected {
            samples: Vec::new(),
            processes: Registry::new(watcher),
            losses: LossCounters::default(),
        }));
        let reader_stop = Arc::new(AtomicBool::new(false));
        let mut reader = Some({
            let collected = collected.clone();
            let reader_stop = reader_stop.clone();
            let clock = self.clock;
            thread::Builder::new()
                .name("ebpf-reader".into())
                .spawn(move || {
                    // One last drain after the stop, so the partial interval is complete.
                    let mut last_round = false;
                    loop {
                        last_round |= reader_stop.load(Ordering::Acquire);
                        let mut fresh = Vec::new();
                        probe.drain(Duration::from_millis(100), |header, stacks| {
                            fresh.push(raw_sample(header, stacks, &clock));
                        });
                        let mut losses = probe.losses();
                        losses.unwind = outcomes_of(probe.outcomes());
                        let mut c = collected.lock().unwrap();
                        for s in &fresh {
                            // Captured now, so that it outlives a short process.
                            c.processes.learn(s.pid);
                        }
                        // A leaf outside the known mappings: the process has exec'd or
                        // loaded a library; its unwind tables follow the new mappings.
                        c.processes.refresh_unmapped(
                            fresh
                                .iter()
                                .map(|s| (s.pid, &s.user[..s.user.len().min(1)])),
                        );
                        c.samples.append(&mut fresh);
                        c.losses = losses;
                        drop(c);
                        if last_round {
                            return;
                        }
                    }
                })?
        });

        let interval = self.config.interval.0;
        let mut reported = LossCounters::default();
        let mut start_ns = self.clock.now_unix_ns();
        let mut deadline = Instant::now() + interval;
        loop {
            let stopping = stop.wait(deadline.saturating_duration_since(Instant::now()));
            deadline += interval;
            if stopping {
                reader_stop.store(true, Ordering::Release);
                if let Some(reader) = reader.take() {
                    let _ = reader.join();
                }
            }
            let end_ns = self.clock.now_unix_ns();
            let (samples, losses, mut processes) = {
                let mut c = collected.lock().unwrap();
                (
                    mem::take(&mut c.samples),
                    c.losses.clone(),
                    // Arcs: a cheap copy, and the reader keeps its table meanwhile, so it
                    // does not read /proc again for processes it already knows.
                    c.processes.clone(),
                )
            };
            let lost = LossCounters {
                ring_buffer_full: losses.ring_buffer_full - reported.ring_buffer_full,
                stack_unreadable: losses.stack_unreadable - reported.stack_unreadable,
                unwind: losses.unwind.since(&reported.unwind),
                ..LossCounters::default()
            };
            reported = losses;
            let batch = assembler.assemble(samples, &mut processes, start_ns, end_ns, lost);
            let mut c = collected.lock().unwrap();
            // Mappings re-read during assembly replace the old ones.
            c.processes.absorb(processes);
            // Processes that are gone, unless samples of theirs are still being collected.
            let pending: HashSet<u32> = c.samples.iter().map(|s| s.pid).collect();
            c.processes.forget_exited(&pending);
            drop(c);
            log_interval(&batch, &assembler);
            *self.stats.symbolizer.lock().unwrap() = assembler.symbolizer().stats();
            *self.stats.perf_maps.lock().unwrap() = assembler.perf_maps().stats();
            publish(batch);
            // The interval's buffers are freed: give their pages back to the kernel rather than
            // keep them in glibc's free lists (an interval of a busy host can take tens of MB).
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
            start_ns = end_ns;
            if stopping {
                return Ok(());
            }
        }
    }
}

/// The probe's cumulative outcome counters (indexed by `unwind::outcome`) by name.
fn outcomes_of(counts: [u64; outcome::COUNT as usize]) -> UnwindOutcomes {
    UnwindOutcomes {
        frame_pointers: counts[outcome::FRAME_POINTERS as usize],
        end_of_stack: counts[outcome::END_OF_STACK as usize],
        fell_back_to_frame_pointers: counts[outcome::FELL_BACK_TO_FRAME_POINTERS as usize],
        no_table_yet: counts[outcome::NO_TABLE_YET as usize],
        depth_limit: counts[outcome::DEPTH_LIMIT as usize],
        read_error: counts[outcome::READ_ERROR as usize],
    }
}

fn log_interval(batch: &ProfileBatch, assembler: &Assembler) {
    let unsymbolized = batch.frames.iter().filter(|f| !f.is_symbolized()).count();
    let cache = assembler.symbolizer().stats();
    let unwind = &batch.lost.unwind;
    tracing::debug!(
        samples = batch.samples.len(),
        unique_stacks = batch.stacks.len(),
        processes = batch.processes.len(),
        lost_ring_buffer_full = batch.lost.ring_buffer_full,
        lost_stack_unreadable = batch.lost.stack_unreadable,
        unsymbolized_frames = unsymbolized,
        frames = batch.frames.len(),
        symbol_cache_hits = cache.hits,
        symbol_cache_misses = cache.misses,
        unwind_end_of_stack = unwind.end_of_stack,
        unwind_fell_back_to_frame_pointers = unwind.fell_back_to_frame_pointers,
        unwind_no_table_yet = unwind.no_table_yet,
        unwind_depth_limit = unwind.depth_limit,
        unwind_read_error = unwind.read_error,
        unwind_frame_pointers = unwind.frame_pointers,
        "interval collected"
    );
}

/// A sample from its record: the header and the stack bytes that follow it.
fn raw_sample(header: &SampleHeader, stacks: &[u8], clock: &WallClock) -> RawSample {
    let addresses = |bytes: &[u8]| -> Vec<u64> {
        bytes
            .chunks_exact(8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
            .filter(|&a| a != 0)
            .collect()
    };
    let kernel_bytes = (header.kernel_stack_bytes.max(0) as usize).min(stacks.len());
    let (kernel, rest) = stacks.split_at(kernel_bytes);
    let user = &rest[..(header.user_stack_bytes.max(0) as usize).min(rest.len())];
    RawSample {
        timestamp_ns: clock.to_unix_ns(header.timestamp_ns),
        pid: header.pid,
        tid: header.tid,
        cpu: header.cpu,
        comm: crate::process::command_name(&header.comm),
        kernel: addresses(kernel),
        user: addresses(user),
    }
}

/// Converts the probe's CLOCK_MONOTONIC timestamps to nanoseconds since the Unix epoch.
#[derive(Clone, Copy)]
struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    fn new() -> Self {
        Self {
            offset_ns: i128::from(clock_ns(libc::CLOCK_REALTIME))
                - i128::from(clock_ns(libc::CLOCK_MONOTONIC)),
        }
    }

    fn to_unix_ns(self, monotonic_ns: u64) -> u64 {
        (i128::from(monotonic_ns) + self.offset_ns) as u64
    }

    fn now_unix_ns(self) -> u64 {
        clock_ns(libc::CLOCK_REALTIME)
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
