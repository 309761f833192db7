//! Turns one interval's raw samples into a [`ProfileBatch`]: filters, symbolizes once per
//! distinct address, names Python frames from their code objects and JIT-compiled code from
//! perf maps, interns everything.

use std::collections::{HashMap, HashSet};

use plugin_api::{
    BatchBuilder, Frame, FrameKind, LossCounters, Mapping, Process, ProfileBatch, Sample,
};
use probe_common::python::decode_frame;
use router_config::ProducerConfig;

use crate::{
    process::{is_running, MapEntry, ProcessInfo, Registry, ServiceResolver},
    python::{self, CodeReader, PythonLayout},
    symbolize::{perf_map::PerfMaps, Symbolizer},
};

use super::host::HostFacts;

/// One sample as it came from the probe, with addresses only.
#[derive(Clone, Debug)]
pub struct RawSample {
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU.
    pub cpu: u32,
    /// Thread name.
    pub comm: String,
    /// Kernel addresses, leaf first.
    pub kernel: Vec<u64>,
    /// User addresses, leaf first.
    pub user: Vec<u64>,
}

/// Builds batches; keeps the symbol caches between intervals.
pub struct Assembler {
    symbolizer: Symbolizer,
    /// Python code objects read from their processes.
    code_reader: CodeReader,
    /// Each CPython process's version layout (`None`: not a supported CPython).
    python_layouts: HashMap<u32, Option<&'static PythonLayout>>,
    /// JIT-compiled code named by the processes' perf maps.
    perf_maps: PerfMaps,
    /// Processes the caches above may hold something of.
    cached_pids: HashSet<u32>,
    host: HostFacts,
    frequency_hz: u64,
    event: String,
    comms: Vec<String>,
    cgroups: Vec<String>,
    services: ServiceResolver,
}

impl Assembler {
    /// An assembler for `config`, sampling `event`.
    pub fn new(config: &ProducerConfig, event: &str, host: HostFacts) -> Self {
        Self {
            symbolizer: Symbolizer::new().with_native_lines(config.native_lines),
            code_reader: CodeReader::new(),
            python_layouts: HashMap::new(),
            perf_maps: PerfMaps::new(),
            cached_pids: HashSet::new(),
            host,
            frequency_hz: u64::from(config.frequency_hz),
            event: event.to_owned(),
            comms: config.comms.clone(),
            cgroups: config.cgroups.clone(),
            services: ServiceResolver::new(&config.services),
        }
    }

    /// The symbolizer's cache counters.
    pub fn symbolizer(&self) -> &Symbolizer {
        &self.symbolizer
    }

    /// The perf map reader (its counters).
    pub fn perf_maps(&self) -> &PerfMaps {
        &self.perf_maps
    }

    fn wanted(&self, sample: &RawSample, process: Option<&ProcessInfo>) -> bool {
        let comm_ok = self.comms.is_empty()
            || self
                .comms
                .iter()
                .any(|c| *c == sample.comm || process.is_some_and(|p| p.comm == *c));
        let cgroup_ok = self.cgroups.is_empty()
            || process.and_then(|p| p.cgroup.as_deref()).is_some_and(|cg| {
                self.cgroups
                    .iter()
                    .any(|want| cg.starts_with(want.as_str()))
            });
        comm_ok && cgroup_ok
    }

    /// The batch for `[start_ns, end_ns)` made of `samples`.
    pub fn assemble(
        &mut self,
        mut samples: Vec<RawSample>,
        processes: &mut Registry,
        start_ns: u64,
        end_ns: u64,
        mut lost: LossCounters,
    ) -> ProfileBatch {
        samples.retain(|s| self.wanted(s, processes.get(s.pid)));
        processes.refresh_unmapped(samples.iter().map(|s| (s.pid, &s.user[..])));
        for s in &mut samples {
            match processes.get(s.pid) {
                Some(process) => drop_unmapped_frames(&mut s.user, process),
                None if !s.user.is_empty() => {
                    // Nothing to check its addresses against: they stay out.
                    s.user.clear();
                    if is_running(s.pid) {
                        lost.process_unreadable += 1;
                    } else {
                        lost.process_exited += 1;
                    }
                }
                None => {}
            }
        }
        self.resolve(&samples, processes);

        let mut b = BatchBuilder::new();
        b.cpu_sample_types();
        let period_ns = 1_000_000_000 / self.frequency_hz.max(1);
        let kernel_path = b.intern("[kernel.kallsyms]");
        let kernel_build_id = self
            .host
            .kernel_build_id
            .as_deref()
            .map_or(0, |id| b.intern(id));
        let kernel_mapping = b.mapping(Mapping {
            pid: 0,
            start: self.host.kernel_text_start,
            end: u64::MAX,
            file_offset: self.host.kernel_text_start,
            path: kernel_path,
            build_id: kernel_build_id,
            kernel: true,
        });
        let mut frames = Vec::new();
        for s in &samples {
            frames.clear();
            for (depth, &address) in s.kernel.iter().enumerate() {
                let function = self
                    .symbolizer
                    .kernel(kernel_lookup(address, depth))
                    .map_or(0, |sym| b.intern(&sym.name));
                frames.push(b.frame(Frame {
                    address,
                    mapping: Some(kernel_mapping).into(),
                    function,
                    kind: FrameKind::Kernel,
                    ..Default::default()
                }));
            }
            let process = processes.get(s.pid);
            for (depth, &address) in s.user.iter().enumerate() {
                let frame = match (decode_frame(address), process) {
                    (Some((code, instruction)), _) => {
                        self.python_frame(&mut b, s.pid, process, code, instruction)
                    }
                    (None, Some(process)) => match process.mapping_of(address) {
                        Some(map) if map.is_file() => {
                            self.user_frame(&mut b, s.pid, map, address, depth)
                        }
                        Some(map) if map.path != "[vdso]" => {
                            self.jit_frame(&mut b, s.pid, process, address)
                        }
                        _ => native(address),
                    },
                    (None, None) => native(address),
                };
                frames.push(b.frame(frame));
            }
            let stack = b.stack(&frames);
            let thread_name = b.intern(&s.comm);
            b.sample(Sample {
                pid: s.pid,
                tid: s.tid,
                cpu: s.cpu,
                stack,
                values: vec![1, period_ns as i64].into(),
                timestamp_ns: s.timestamp_ns,
                thread_name,
            });
        }
        let pids: HashSet<u32> = samples.iter().map(|s| s.pid).collect();
        for pid in pids {
            let info = processes.get(pid);
            let comm = info
                .map(|p| p.comm.clone())
                .filter(|c| !c.is_empty())
                .or_else(|| {
                    samples
                        .iter()
                        .find(|s| s.pid == pid)
                        .map(|s| s.comm.clone())
                })
                .unwrap_or_default();
            let service = info.and_then(|p| self.services.resolve(p));
            let service = service.as_ref();
            let process = Process {
                pid,
                comm: b.intern(&comm),
                exe: b.intern_optional(info.and_then(|p| p.exe.as_deref())),
                container_id: b.intern_optional(info.and_then(|p| p.container_id.as_deref())),
                service: b.intern_optional(service.map(|s| s.name.as_str())),
                service_inferred: service.is_some_and(|s| s.inferred),
                env: b.intern_optional(service.and_then(|s| s.env.as_deref())),
                version: b.intern_optional(service.and_then(|s| s.version.as_deref())),
            };
            b.process(process);
        }
        self.forget_exited(processes);
        self.symbolizer.end_interval();
        let header = b.header();
        header.start_ns = start_ns;
        header.end_ns = end_ns;
        header.frequency_hz = self.frequency_hz;
        header.period_ns = period_ns;
        header.lost = lost;
        let host = self.host.intern(&mut b);
        let event = b.intern(&self.event);
        let header = b.header();
        header.host = host;
        header.event = event;
        b.finish()
    }

    fn user_frame(
        &mut self,
        b: &mut BatchBuilder,
        pid: u32,
        map: &MapEntry,
        address: u64,
        depth: usize,
    ) -> Frame {
        let path = b.intern(&map.path);
        let build_id = self
            .symbolizer
            .build_id(pid, map)
            .map_or(0, |id| b.intern(id));
        let mapping = b.mapping(Mapping {
            pid,
            start: map.start,
            end: map.end,
            file_offset: map.offset,
            path,
            build_id,
            kernel: false,
        });
        let symbol = self
            .symbolizer
            .user(pid, map, lookup_offset(map, address, depth));
        Frame {
            address,
            mapping: Some(mapping).into(),
            function: symbol.map_or(0, |s| b.intern(&s.name)),
            file: symbol
                .and_then(|s| s.file.as_deref())
                .map_or(0, |f| b.intern(f)),
            line: symbol.map_or(0, |s| s.line),
            kind: FrameKind::Native,
            runtime: 0,
        }
    }

    /// A Python frame: code object `code` executing instruction `instruction`, named from
    /// the code object (read from the process once).
    fn python_frame(
        &mut self,
        b: &mut BatchBuilder,
        pid: u32,
        process: Option<&ProcessInfo>,
        code: u64,
        instruction: u32,
    ) -> Frame {
        self.cached_pids.insert(pid);
        let layout = *self.python_layouts.entry(pid).or_insert_with(|| {
            process
                .and_then(|p| python::detect(pid, &p.maps))
                .map(|p| p.layout)
        });
        let found = layout.and_then(|l| self.code_reader.resolve(pid, l, code, instruction));
        Frame {
            address: code,
            function: b.intern_optional(found.as_ref().map(|f| &*f.function)),
            file: b.intern_optional(found.as_ref().map(|f| &*f.file)),
            line: found.map_or(0, |f| f.line),
            kind: FrameKind::Interpreted,
            runtime: b.intern("cpython"),
            ..Default::default()
        }
    }

    /// A frame in anonymous executable memory: JIT-compiled code, named by the process's
    /// perf map when it writes one.
    fn jit_frame(
        &mut self,
        b: &mut BatchBuilder,
        pid: u32,
        process: &ProcessInfo,
        address: u64,
    ) -> Frame {
        self.cached_pids.insert(pid);
        match self.perf_maps.lookup(pid, address) {
            Some(name) => Frame {
                address,
                function: b.intern(&name),
                kind: FrameKind::Jit,
                runtime: b.intern_optional(jit_runtime(process, &name)),
                ..Default::default()
            },
            None => native(address),
        }
    }

    /// Drops what the Python, JIT and symbol caches hold of processes the registry has
    /// forgotten.
    fn forget_exited(&mut self, processes: &Registry) {
        let gone: HashSet<u32> = self
            .cached_pids
            .iter()
            .copied()
            .filter(|&pid| processes.get(pid).is_none())
            .collect();
        self.symbolizer.forget_processes(&gone);
        for pid in gone {
            self.cached_pids.remove(&pid);
            self.python_layouts.remove(&pid);
            self.code_reader.forget(pid);
            self.perf_maps.forget(pid);
        }
    }

    /// Symbolizes every kernel address and every user file offset not seen before.
    fn resolve(&mut self, samples: &[RawSample], processes: &Registry) {
        let kernel: HashSet<u64> = samples
            .iter()
            .flat_map(|s| s.kernel.iter().enumerate())
            .map(|(depth, &a)| kernel_lookup(a, depth))
            .collect();
        self.symbolizer.prepare_kernel(&kernel);

        let mut per_mapping: HashMap<(u32, u64), (&MapEntry, HashSet<u64>)> = HashMap::new();
        for s in samples {
            let Some(process) = processes.get(s.pid) else {
                continue;
            };
            for (depth, &address) in s.user.iter().enumerate() {
                if let Some(map) = process.mapping_of(address).filter(|m| m.is_file()) {
                    per_mapping
                        .entry((s.pid, map.start))
                        .or_insert_with(|| (map, HashSet::new()))
                        .1
                        .insert(lookup_offset(map, address, depth));
                }
            }
        }
        for (&(pid, _), (map, offsets)) in &per_mapping {
            self.cached_pids.insert(pid);
            self.symbolizer.prepare_user(pid, map, offsets);
        }
    }
}

/// A native frame with nothing known of it but its address.
fn native(address: u64) -> Frame {
    Frame {
        address,
        kind: FrameKind::Native,
        ..Default::default()
    }
}

/// The runtime whose JIT wrote perf-map entry `name` in `process`: CPython's trampolines
/// (`py::`), else the one the executable's name tells (`node`: V8, `java`: HotSpot).
fn jit_runtime<'a>(process: &'a ProcessInfo, name: &str) -> Option<&'a str> {
    if name.starts_with("py::") {
        return Some("cpython");
    }
    let exe = process.exe.as_deref()?;
    match exe.rsplit('/').next()? {
        "node" | "nodejs" => Some("v8"),
        "java" => Some("hotspot"),
        "dotnet" => Some("dotnet"),
        name if name.starts_with("python") => Some("cpython"),
        _ => None,
    }
}

/// The file offset to symbolize for a frame: return addresses (every frame but the leaf)
/// point after the call, so look one byte back to land inside the calling instruction.
fn lookup_offset(map: &MapEntry, address: u64, depth: usize) -> u64 {
    let address = if depth == 0 {
        address
    } else {
        address.saturating_sub(1).max(map.start)
    };
    map.file_offset(address)
}

/// The kernel address to symbolize for a frame (see [`lookup_offset`]).
fn kernel_lookup(address: u64, depth: usize) -> u64 {
    if depth == 0 {
        address
    } else {
        address - 1
    }
}

/// Cuts a user stack at its first address outside the process's executable mappings: what a
/// frame-pointer walk read from a register used for something else (text taken for an
/// address), never a frame.
fn drop_unmapped_frames(user: &mut Vec<u64>, process: &ProcessInfo) {
    if let Some(first_bad) = user.iter().position(|&a| !process.accounts_for(a)) {
        user.truncate(first_bad);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_stack_left_out_counts_once_per_sample_by_why() {
        let host = HostFacts {
            hostname: "host".into(),
            kernel_release: "6.18".into(),
            os_release: "Debian".into(),
            arch: "x86_64".into(),
            cpu_count: 1,
            kernel_text_start: 0xffff_ffff_8100_0000,
            kernel_build_id: None,
        };
        let mut assembler = Assembler::new(&ProducerConfig::default(), "cpu-clock", host);
        let exited = |i: u64| RawSample {
            timestamp_ns: i,
            // No process has this pid: the registry never knew it.
            pid: u32::MAX - 1,
            tid: u32::MAX - 1,
            cpu: 0,
            comm: "gone".into(),
            kernel: vec![0xffff_ffff_8100_1000],
            user: vec![0x40_1000 + i; 20],
        };
        let batch = assembler.assemble(
            (0..3).map(exited).collect(),
            &mut Registry::new(None),
            0,
            10,
            LossCounters::default(),
        );
        assert_eq!(
            batch.lost.process_exited, 3,
            "one per sample, not per frame"
        );
        assert_eq!(batch.lost.process_unreadable, 0);
        assert_eq!(batch.samples.len(), 3, "the samples are kept");
        assert!(
            batch.stacks.iter().all(|s| s.len == 1),
            "with their kernel frame"
        );

        // A process that runs but could not be read (no permission) is not one that exited.
        let unreadable = RawSample {
            pid: std::process::id(),
            ..exited(4)
        };
        let batch = assembler.assemble(
            vec![unreadable],
            &mut Registry::new(None),
            0,
            10,
            LossCounters::default(),
        );
        assert_eq!(batch.lost.process_exited, 0);
        assert_eq!(batch.lost.process_unreadable, 1);
    }
}
