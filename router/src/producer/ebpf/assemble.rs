//! Turns one interval's raw samples into a [`ProfileBatch`]: filters, symbolizes once per
//! distinct address, interns everything.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use plugin_api::{
    BatchBuilder, Frame, FrameKind, LossCounters, Mapping, Process, ProfileBatch, Sample,
};
use router_config::ProducerConfig;

use crate::{
    process::{MapEntry, ProcessInfo, Registry, ServiceResolver},
    symbolize::Symbolizer,
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
            symbolizer: Symbolizer::new(),
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
                    lost.process_exited += 1;
                }
                None => {}
            }
        }
        self.resolve(&samples, processes);

        let mut b = BatchBuilder::new();
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
                let map = process
                    .and_then(|p| p.mapping_of(address))
                    .filter(|m| m.is_file());
                let frame = match map {
                    Some(map) => self.user_frame(&mut b, s.pid, map, address, depth),
                    None => Frame {
                        address,
                        kind: FrameKind::User,
                        ..Default::default()
                    },
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
                count: 1,
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
        let header = b.header();
        header.start_ns = start_ns;
        header.end_ns = end_ns;
        header.frequency_hz = self.frequency_hz;
        header.period_ns = 1_000_000_000 / self.frequency_hz.max(1);
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
        let build_id = self.symbolizer.build_id(map).map_or(0, |id| b.intern(id));
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
            .user(map, lookup_offset(map, address, depth));
        Frame {
            address,
            mapping: Some(mapping).into(),
            function: symbol.map_or(0, |s| b.intern(&s.name)),
            file: symbol
                .and_then(|s| s.file.as_deref())
                .map_or(0, |f| b.intern(f)),
            line: symbol.map_or(0, |s| s.line),
            kind: FrameKind::User,
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

        let mut per_file: HashMap<(u64, u64), (MapEntry, PathBuf, HashSet<u64>)> = HashMap::new();
        for s in samples {
            let Some(process) = processes.get(s.pid) else {
                continue;
            };
            for (depth, &address) in s.user.iter().enumerate() {
                if let Some(map) = process.mapping_of(address).filter(|m| m.is_file()) {
                    let entry = per_file.entry((map.dev, map.inode)).or_insert_with(|| {
                        (map.clone(), readable_path(s.pid, map), HashSet::new())
                    });
                    entry.2.insert(lookup_offset(map, address, depth));
                }
            }
        }
        for (map, path, offsets) in per_file.values() {
            self.symbolizer.prepare_file(map, path, offsets);
        }
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

/// Where the router can read a process's file while the process lives: its mapping in
/// /proc/PID/map_files (the mapped file itself, even deleted or replaced since), else
/// through /proc/PID/root (another mount namespace); else the path itself.
fn readable_path(pid: u32, map: &MapEntry) -> PathBuf {
    [
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            map.start, map.end
        )),
        PathBuf::from(format!("/proc/{pid}/root{}", map.path)),
    ]
    .into_iter()
    .find(|path| path.exists())
    .unwrap_or_else(|| Path::new(&map.path).to_owned())
}

/// Cuts a user stack at its first address outside the process's executable mappings: what a
/// frame-pointer walk read from a register used for something else (text taken for an
/// address), never a frame.
fn drop_unmapped_frames(user: &mut Vec<u64>, process: &ProcessInfo) {
    if let Some(first_bad) = user.iter().position(|&a| process.mapping_of(a).is_none()) {
        user.truncate(first_bad);
    }
}
