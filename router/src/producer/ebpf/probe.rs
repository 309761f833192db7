//! The kernel side, seen from user space: loads the eBPF object built by build.rs, attaches it
//! to a sampling perf event on every online CPU, and reads its ring buffer and loss counters.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        perf_event::{HardwareEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        PerfEvent,
    },
    util::online_cpus,
    Ebpf, EbpfLoader,
};
use plugin_api::LossCounters;
use probe_common::{
    loss,
    unwind::{outcome, UnwindRow},
    SampleEvent, SampleHeader,
};
use router_config::{ProducerConfig, SampledEvent, Unwinder};

use crate::unwind_tables::{ProbeMaps, SharedArray, MAPPING_CAPACITY};

/// The eBPF object, compiled from probe-ebpf by build.rs.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.bpf.o"));

/// Why the probe could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The object did not load (verifier, maps, privileges).
    #[error("loading the eBPF program failed: {0}")]
    Load(String),
    /// The sampling program could not be attached to a CPU's perf event.
    #[error(
        "attaching the sampling program to the {event} perf event of CPU {cpu} failed: {reason}"
    )]
    Attach {
        /// The event.
        event: &'static str,
        /// The CPU.
        cpu: u32,
        /// What the kernel said.
        reason: String,
    },
    /// A map the program needs is missing or unreadable.
    #[error("eBPF map {map}: {reason}")]
    Map {
        /// The map.
        map: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// A loaded and attached probe.
pub struct Probe {
    /// Keeps the programs and their links alive.
    _ebpf: Ebpf,
    samples: RingBuf<MapData>,
    /// Edge-triggered epoll on `samples`: reports only the wake-ups the probe asks for.
    wakeups: OwnedFd,
    losses: PerCpuArray<MapData, u64>,
    outcomes: PerCpuArray<MapData, u64>,
    /// Holds the unwinder and Python walker programs for the tail calls.
    _programs: Option<ProgramArray<MapData>>,
    /// Where the unwind-table manager writes (`unwinder = "dwarf"`); taken by the producer.
    pub unwind_maps: Option<ProbeMaps>,
    /// The event actually sampled (`cpu-clock` after a fallback from `cpu-cycles`).
    pub event: &'static str,
    /// Number of CPUs sampled.
    pub cpus: usize,
}

impl Probe {
    /// Loads the program with `config`'s filters and attaches it to every online CPU.
    pub fn start(config: &ProducerConfig) -> Result<Probe, ProbeError> {
        let filter_by_pid = u8::from(!config.pids.is_empty());
        let include_idle = u8::from(config.include_idle);
        let include_kernel = u8::from(config.include_kernel);
        let with_cfi = config.unwinder == Unwinder::Dwarf;
        let unwind_with_cfi = u8::from(with_cfi);
        let table_rows = unwind_table_rows(config);
        let cpus = online_cpus().map_err(|(what, e)| ProbeError::Load(format!("{what}: {e}")))?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(
                "SAMPLES",
                ring_buffer_bytes(cpus.len(), config.frequency_hz),
            )
            .override_global("FILTER_BY_PID", &filter_by_pid, true)
            .override_global("INCLUDE_IDLE", &include_idle, true)
            .override_global("INCLUDE_KERNEL", &include_kernel, true)
            .override_global("UNWIND_WITH_CFI", &unwind_with_cfi, true)
            .override_global("FRAMES_WANTED", &config.max_stack_depth, true)
            .map_max_entries("UNWIND_ROWS", if with_cfi { table_rows } else { 1 })
            .map_max_entries("MAPPINGS", if with_cfi { MAPPING_CAPACITY } else { 1 })
            .load(PROBE_OBJECT)
            .map_err(|e| ProbeError::Load(e.to_string()))?;

        if !config.pids.is_empty() {
            let map = ebpf.map_mut("TARGET_PIDS").ok_or(ProbeError::Map {
                map: "TARGET_PIDS",
                reason: "missing".into(),
            })?;
            let mut pids: BpfHashMap<_, u32, u8> =
                BpfHashMap::try_from(map).map_err(|e| map_error("TARGET_PIDS", e))?;
            for pid in &config.pids {
                pids.insert(pid, 1, 0)
                    .map_err(|e| map_error("TARGET_PIDS", e))?;
            }
        }

        // The kernel empties a program array when user space drops it: the probe keeps it.
        let mut unwinder_slot = None;
        let unwind_maps = if with_cfi {
            let mut programs = ProgramArray::try_from(take_map(&mut ebpf, "PROGRAMS")?)
                .map_err(|e| map_error("PROGRAMS", e))?;
            // The unwinder at 0, the Python walker at 1 (see the probe's `PROGRAMS`).
            for (index, name) in [(0, "unwind_user"), (1, "walk_python")] {
                let fd = load_program(&mut ebpf, name)?
                    .fd()
                    .map_err(|e| ProbeError::Load(describe_program_error(e)))?
                    .try_clone()
                    .map_err(|e| ProbeError::Load(format!("{name}: {e}")))?;
                programs
                    .set(index, &fd, 0)
                    .map_err(|e| map_error("PROGRAMS", e))?;
            }
            unwinder_slot = Some(programs);
            let rows = shared_array(&ebpf, "UNWIND_ROWS", table_rows)?;
            let mappings = shared_array(&ebpf, "MAPPINGS", MAPPING_CAPACITY)?;
            let processes = BpfHashMap::try_from(take_map(&mut ebpf, "PROCESS_MAPPINGS")?)
                .map_err(|e| map_error("PROCESS_MAPPINGS", e))?;
            let python = BpfHashMap::try_from(take_map(&mut ebpf, "PYTHON_PROCESSES")?)
                .map_err(|e| map_error("PYTHON_PROCESSES", e))?;
            Some(ProbeMaps::new(rows, mappings, processes, python))
        } else {
            None
        };
        let program = load_program(&mut ebpf, "sample_cpu")?;
        let frequency = SamplePolicy::Frequency(u64::from(config.frequency_hz));
        let mut event = match config.event {
            SampledEvent::CpuCycles => "cpu-cycles",
            SampledEvent::CpuClock => "cpu-clock",
        };
        for &cpu in &cpus {
            let scope = PerfEventScope::AllProcessesOneCpu { cpu };
            if event == "cpu-cycles" {
                match program.attach(
                    PerfEventConfig::Hardware(HardwareEvent::CpuCycles),
                    scope,
                    frequency,
                    false,
                ) {
                    Ok(_) => continue,
                    Err(e) if cpu == cpus[0] => {
                        tracing::warn!(
                            "cpu-cycles cannot be sampled here (no hardware PMU?): {}; falling back to cpu-clock",
                            describe_program_error(e)
                        );
                        event = "cpu-clock";
                    }
                    Err(e) => {
                        return Err(ProbeError::Attach {
                            event,
                            cpu,
                            reason: describe_program_error(e),
                        })
                    }
                }
            }
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    scope,
                    frequency,
                    false,
                )
                .map_err(|e| ProbeError::Attach {
                    event,
                    cpu,
                    reason: describe_program_error(e),
                })?;
        }

        let samples = RingBuf::try_from(take_map(&mut ebpf, "SAMPLES")?)
            .map_err(|e| map_error("SAMPLES", e))?;
        let losses = PerCpuArray::try_from(take_map(&mut ebpf, "LOSSES")?)
            .map_err(|e| map_error("LOSSES", e))?;
        let outcomes = PerCpuArray::try_from(take_map(&mut ebpf, "OUTCOMES")?)
            .map_err(|e| map_error("OUTCOMES", e))?;
        let wakeups = edge_triggered_epoll(&samples).map_err(|e| ProbeError::Map {
            map: "SAMPLES",
            reason: format!("epoll: {e}"),
        })?;
        Ok(Probe {
            _ebpf: ebpf,
            samples,
            wakeups,
            losses,
            outcomes,
            _programs: unwinder_slot,
            unwind_maps,
            event,
            cpus: cpus.len(),
        })
    }

    /// Waits up to `timeout` or until the probe wakes user space (a new process, a filling
    /// buffer), then hands every queued sample to `take`: its header and the bytes of its
    /// stacks (kernel, then user).
    pub fn drain(&mut self, timeout: Duration, mut take: impl FnMut(&SampleHeader, &[u8])) {
        let mut ready = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: a valid epoll descriptor and room for one event.
        unsafe {
            libc::epoll_wait(
                self.wakeups.as_raw_fd(),
                &mut ready,
                1,
                timeout.as_millis() as i32,
            )
        };
        while let Some(item) = self.samples.next() {
            if let Some((header, stacks)) = parse_record(&item) {
                take(&header, stacks);
            }
        }
    }

    /// Samples by how their user stack was walked (indexed by `unwind::outcome`), summed
    /// over every CPU, since the probe started.
    pub fn outcomes(&self) -> [u64; outcome::COUNT as usize] {
        let mut counts = [0; outcome::COUNT as usize];
        for (index, count) in counts.iter_mut().enumerate() {
            *count = sum_per_cpu(&self.outcomes, index as u32);
        }
        counts
    }

    /// The loss counters summed over every CPU, since the probe started.
    pub fn losses(&self) -> LossCounters {
        let sum = |index: u32| sum_per_cpu(&self.losses, index);
        LossCounters {
            ring_buffer_full: sum(loss::RING_BUFFER_FULL),
            stack_unreadable: sum(loss::USER_STACK_UNREADABLE) + sum(loss::KERNEL_STACK_UNREADABLE),
            ..Default::default()
        }
    }
}

/// A ring-buffer record split into its header and the stack bytes after it (kernel, then
/// user); `None` when it is too short to hold a header.
pub(super) fn parse_record(record: &[u8]) -> Option<(SampleHeader, &[u8])> {
    let (header, stacks) = record.split_at_checked(size_of::<SampleHeader>())?;
    // SAFETY: `header` holds a whole SampleHeader, plain integers with no padding (any bytes
    // are a valid value); read_unaligned copes with the ring buffer's 8-byte alignment.
    let header = unsafe { std::ptr::read_unaligned(header.as_ptr().cast::<SampleHeader>()) };
    Some((header, stacks))
}

fn sum_per_cpu(counters: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    counters
        .get(&index, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}

/// Rows of the unwind-table array: the configured budget in 8-byte rows.
fn unwind_table_rows(config: &ProducerConfig) -> u32 {
    (config.unwind_table_budget.0 / size_of::<UnwindRow>() as u64).min(u64::from(u32::MAX)) as u32
}

/// A memory-mappable array map of the probe, with its own descriptor.
fn shared_array(ebpf: &Ebpf, name: &'static str, capacity: u32) -> Result<SharedArray, ProbeError> {
    let Some(Map::Array(data)) = ebpf.map(name) else {
        return Err(ProbeError::Map {
            map: name,
            reason: "missing or not an array".into(),
        });
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| ProbeError::Map {
            map: name,
            reason: e.to_string(),
        })?;
    Ok(SharedArray { fd, capacity })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, ProbeError> {
    ebpf.take_map(name).ok_or(ProbeError::Map {
        map: name,
        reason: "missing".into(),
    })
}

/// Loads the perf_event program `name` into the kernel (the verifier runs here).
fn load_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut PerfEvent, ProbeError> {
    let program: &mut PerfEvent = ebpf
        .program_mut(name)
        .ok_or_else(|| ProbeError::Load(format!("program {name} not found")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
    program
        .load()
        .map_err(|e| ProbeError::Load(format!("{name}: {}", describe_program_error(e))))?;
    Ok(program)
}

/// An epoll instance watching `samples` edge-triggered. A level-triggered poll returns at once
/// while any sample is queued, which would undo the probe's choice not to wake the reader.
fn edge_triggered_epoll(samples: &RingBuf<MapData>) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the new descriptor is owned at once, `samples` outlives the call.
    unsafe {
        let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        let epoll = OwnedFd::from_raw_fd(epoll);
        let mut interest = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        let fd = samples.as_fd().as_raw_fd();
        if libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut interest) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(epoll)
    }
}

/// Size of the ring buffer: a quarter of a second of full-depth samples from every CPU (the
/// reader drains it every 100 ms and is woken when it is a quarter full; records are as long
/// as their stacks, so typical samples fit for several seconds), a power of two between
/// 256 KiB and 64 MiB. It is resident memory: sized to the host, not to the largest host.
pub fn ring_buffer_bytes(cpus: usize, frequency_hz: u32) -> u32 {
    let per_second = cpus as u64 * u64::from(frequency_hz) * size_of::<SampleEvent>() as u64;
    (per_second / 4)
        .next_power_of_two()
        .clamp(256 << 10, 64 << 20) as u32
}

fn map_error(map: &'static str, e: aya::maps::MapError) -> ProbeError {
    ProbeError::Map {
        map,
        reason: e.to_string(),
    }
}

/// aya's error with its source chain (the kernel's errno and verifier log live there).
fn describe_program_error(e: aya::programs::ProgramError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::ring_buffer_bytes;

    #[test]
    fn the_ring_buffer_holds_a_quarter_second_of_deepest_samples_and_stays_bounded() {
        assert_eq!(ring_buffer_bytes(2, 99), 256 << 10);
        assert_eq!(ring_buffer_bytes(64, 99), 4 << 20);
        assert_eq!(ring_buffer_bytes(1, 1), 256 << 10);
        assert_eq!(ring_buffer_bytes(1024, 10_000), 64 << 20);
    }
}
