//! The data model: one [`ProfileBatch`] per collection interval.
//!
//! Every table is interned: strings live once in [`ProfileBatch::strings`] and are referred to
//! by [`StringId`]; frames refer to mappings, stacks to frames, samples to stacks, all by index.
//! String index 0 is always the empty string, meaning "unknown / none".

use abi_stable::{
    std_types::{ROption, RString, RVec},
    StableAbi,
};
use serde::{Deserialize, Serialize};

/// Index into [`ProfileBatch::strings`]; 0 is the empty string ("none").
pub type StringId = u32;

/// One collection interval of CPU samples, shared read-only by every consumer.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileBatch {
    /// Start of the interval, nanoseconds since the Unix epoch.
    pub start_ns: u64,
    /// End of the interval, nanoseconds since the Unix epoch.
    pub end_ns: u64,
    /// Nanoseconds of CPU time one sample stands for (1e9 / frequency).
    pub period_ns: u64,
    /// Sampling frequency per CPU, in Hz.
    pub frequency_hz: u64,
    /// The perf event that drove the sampling (`cpu-clock`, `cpu-cycles`).
    pub event: StringId,
    /// What each sample's `values` measure, in order: pprof's `type/unit` pairs. A CPU batch
    /// has [`SAMPLES_COUNT`] then [`CPU_NANOSECONDS`]; another producer (off-CPU time,
    /// allocations) brings its own types, not a new contract.
    pub sample_types: RVec<ValueType>,
    /// Facts about the host that produced the samples.
    pub host: HostInfo,
    /// The string table; entry 0 is always `""`.
    pub strings: RVec<RString>,
    /// Memory mappings referenced by frames.
    pub mappings: RVec<Mapping>,
    /// Distinct frames referenced by stacks.
    pub frames: RVec<Frame>,
    /// Distinct stacks; each is a range of [`ProfileBatch::stack_frames`].
    pub stacks: RVec<Stack>,
    /// Frame indices of every stack, concatenated, leaf first within each stack.
    pub stack_frames: RVec<u32>,
    /// The samples, in time order.
    pub samples: RVec<Sample>,
    /// Processes seen in this interval, sorted by pid.
    pub processes: RVec<Process>,
    /// What was lost on the way.
    pub lost: LossCounters,
}

/// Facts about the host.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name.
    pub hostname: StringId,
    /// Kernel release (`uname -r`).
    pub kernel_release: StringId,
    /// Operating system description (PRETTY_NAME of /etc/os-release).
    pub os_release: StringId,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: StringId,
    /// Number of online CPUs.
    pub cpu_count: u32,
}

/// A memory mapping of a process (or of the kernel).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mapping {
    /// Process that owns the mapping (0 for the kernel).
    pub pid: u32,
    /// First address of the mapping.
    pub start: u64,
    /// One past the last address of the mapping.
    pub end: u64,
    /// Offset in the file of `start`.
    pub file_offset: u64,
    /// Path of the mapped file (`[kernel.kallsyms]` for the kernel).
    pub path: StringId,
    /// GNU build id as lowercase hex, 0 when unknown.
    pub build_id: StringId,
    /// Whether this is the kernel's mapping.
    pub kernel: bool,
}

/// What a sample value measures: a `type/unit` pair of pprof (`samples/count`,
/// `cpu/nanoseconds`), both strings of the batch.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueType {
    /// What is counted (`samples`, `cpu`, `alloc_space`).
    pub kind: StringId,
    /// Its unit (`count`, `nanoseconds`, `bytes`).
    pub unit: StringId,
}

/// The value type that counts samples.
pub const SAMPLES_COUNT: (&str, &str) = ("samples", "count");
/// The value type of CPU time.
pub const CPU_NANOSECONDS: (&str, &str) = ("cpu", "nanoseconds");

/// What kind of code a frame is.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FrameKind {
    /// Kernel code.
    Kernel,
    /// Native user-space code (machine code from a file: executables, libraries).
    Native,
    /// A function of an interpreted language, named by its runtime (`Frame::runtime`:
    /// `cpython`); its `file` and `line` are the source's.
    Interpreted,
    /// Code compiled at run time by a JIT (`Frame::runtime`: `v8`, `hotspot`, or empty when
    /// unknown), named from the runtime's perf map.
    Jit,
    /// Not known.
    #[default]
    Unknown,
}

/// One distinct code location.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    /// Instruction address (virtual address in the process, or kernel address).
    pub address: u64,
    /// Index into [`ProfileBatch::mappings`], when the mapping is known.
    pub mapping: ROption<u32>,
    /// Function name, 0 when not symbolized.
    pub function: StringId,
    /// Source file, 0 when unknown.
    pub file: StringId,
    /// Source line, 0 when unknown.
    pub line: u32,
    /// Kernel, native, interpreted or JIT-compiled code.
    pub kind: FrameKind,
    /// The runtime that runs the code of an interpreted or JIT frame (`cpython`, `v8`,
    /// `hotspot`), 0 for kernel and native frames or when unknown.
    pub runtime: StringId,
}

impl Frame {
    /// Whether the frame carries a function name.
    pub fn is_symbolized(&self) -> bool {
        self.function != 0
    }
}

/// A stack: a range of [`ProfileBatch::stack_frames`], leaf first.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    /// First entry in `stack_frames`.
    pub offset: u32,
    /// Number of frames.
    pub len: u32,
}

/// One sampled event (or several identical ones, `count`).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Logical CPU that ran the thread.
    pub cpu: u32,
    /// Index into [`ProfileBatch::stacks`].
    pub stack: u32,
    /// The sample's values, one per [`ProfileBatch::sample_types`], in that order.
    pub values: RVec<i64>,
    /// When the (first) event happened, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// The thread's name (its comm) at sampling time.
    pub thread_name: StringId,
}

/// A process seen in the interval.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// Command name of the main thread.
    pub comm: StringId,
    /// Path of the executable, 0 when unknown.
    pub exe: StringId,
    /// Container id from the process's cgroup, 0 when none.
    pub container_id: StringId,
    /// The service the process belongs to: its `DD_SERVICE`, else its `OTEL_SERVICE_NAME`,
    /// else a configured rule's, else its executable's name; 0 when the router infers none.
    #[serde(default)]
    pub service: StringId,
    /// Whether `service` is only the executable's name (`service_inferred:yes` in Datadog).
    #[serde(default)]
    pub service_inferred: bool,
    /// The process's `DD_ENV`, 0 when unset.
    #[serde(default)]
    pub env: StringId,
    /// The process's `DD_VERSION`, 0 when unset.
    #[serde(default)]
    pub version: StringId,
}

/// Counters of what was lost between the kernel and the batch.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossCounters {
    /// Samples dropped because the ring buffer was full.
    pub ring_buffer_full: u64,
    /// Stacks the kernel could not read (the sample is kept without them).
    pub stack_unreadable: u64,
    /// Samples whose user stack was left out because their process had exited before
    /// the router could read its mappings.
    pub process_exited: u64,
    /// Samples whose user stack was left out because their process, still running, could
    /// not be read (no permission to its /proc/PID/maps).
    #[serde(default)]
    pub process_unreadable: u64,
    /// How the interval's user stacks were walked and why each ended, in samples.
    #[serde(default)]
    pub unwind: UnwindOutcomes,
}

impl LossCounters {
    /// Adds another interval's counters to these.
    pub fn add(&mut self, other: &LossCounters) {
        self.ring_buffer_full += other.ring_buffer_full;
        self.stack_unreadable += other.stack_unreadable;
        self.process_exited += other.process_exited;
        self.process_unreadable += other.process_unreadable;
        self.unwind.add(&other.unwind);
    }
}

/// Samples by how their user stack was walked and why the walk ended.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnwindOutcomes {
    /// Walked with frame pointers only (`unwinder = "frame-pointer"`).
    pub frame_pointers: u64,
    /// Unwound with CFI to the outermost frame (`_start`, `clone3`).
    pub end_of_stack: u64,
    /// Reached the end after frame-pointer steps where a file had no unwind row.
    pub fell_back_to_frame_pointers: u64,
    /// The process's unwind tables were not loaded yet: frame pointers instead.
    pub no_table_yet: u64,
    /// Cut at `max_stack_depth`.
    pub depth_limit: u64,
    /// Ended by a failed read of the stack or an address outside every mapping.
    pub read_error: u64,
}

impl UnwindOutcomes {
    /// Adds another interval's counts to these.
    pub fn add(&mut self, other: &UnwindOutcomes) {
        for (mine, theirs) in self.counts_mut().into_iter().zip(other.counts()) {
            *mine += theirs;
        }
    }

    /// The counts since `earlier` (cumulative counters read twice).
    pub fn since(&self, earlier: &UnwindOutcomes) -> UnwindOutcomes {
        let mut delta = self.clone();
        for (count, before) in delta.counts_mut().into_iter().zip(earlier.counts()) {
            *count -= before;
        }
        delta
    }

    /// Each outcome's name (as in `/metrics`) and count.
    pub fn named(&self) -> [(&'static str, u64); 6] {
        let names = [
            "frame_pointers",
            "end_of_stack",
            "fell_back_to_frame_pointers",
            "no_table_yet",
            "depth_limit",
            "read_error",
        ];
        let counts = self.counts();
        std::array::from_fn(|i| (names[i], counts[i]))
    }

    fn counts(&self) -> [u64; 6] {
        [
            self.frame_pointers,
            self.end_of_stack,
            self.fell_back_to_frame_pointers,
            self.no_table_yet,
            self.depth_limit,
            self.read_error,
        ]
    }

    fn counts_mut(&mut self) -> [&mut u64; 6] {
        [
            &mut self.frame_pointers,
            &mut self.end_of_stack,
            &mut self.fell_back_to_frame_pointers,
            &mut self.no_table_yet,
            &mut self.depth_limit,
            &mut self.read_error,
        ]
    }
}

impl ProfileBatch {
    /// The string with this id (`""` when out of range).
    pub fn str(&self, id: StringId) -> &str {
        self.strings.get(id as usize).map_or("", |s| s.as_str())
    }

    /// The frames of stack `stack`, leaf first.
    ///
    /// ```
    /// # use plugin_api::{BatchBuilder, FrameKind};
    /// let mut b = BatchBuilder::new();
    /// let leaf = b.frame_symbolized(0x10, None, "leaf", FrameKind::Native);
    /// let root = b.frame_symbolized(0x20, None, "main", FrameKind::Native);
    /// let stack = b.stack(&[leaf, root]);
    /// let batch = b.finish();
    /// let names: Vec<&str> = batch.stack(stack).map(|f| batch.str(f.function)).collect();
    /// assert_eq!(names, ["leaf", "main"]);
    /// ```
    pub fn stack(&self, stack: u32) -> impl ExactSizeIterator<Item = &Frame> + DoubleEndedIterator {
        self.stack_frame_ids(stack)
            .iter()
            .map(|&f| &self.frames[f as usize])
    }

    /// The frame indices of stack `stack`, leaf first.
    pub fn stack_frame_ids(&self, stack: u32) -> &[u32] {
        let s = self.stacks[stack as usize];
        &self.stack_frames[s.offset as usize..(s.offset + s.len) as usize]
    }

    /// The process with this pid, when the batch has it.
    pub fn process(&self, pid: u32) -> Option<&Process> {
        self.processes
            .binary_search_by_key(&pid, |p| p.pid)
            .ok()
            .map(|i| &self.processes[i])
    }

    /// The index of the value type `(kind, unit)` in [`ProfileBatch::sample_types`].
    pub fn value_index(&self, (kind, unit): (&str, &str)) -> Option<usize> {
        self.sample_types
            .iter()
            .position(|t| self.str(t.kind) == kind && self.str(t.unit) == unit)
    }

    /// Each value type as its `(kind, unit)` strings.
    pub fn value_types(&self) -> impl Iterator<Item = (&str, &str)> {
        self.sample_types
            .iter()
            .map(|t| (self.str(t.kind), self.str(t.unit)))
    }

    /// How many events each sample stands for, in sample order: its [`SAMPLES_COUNT`]
    /// value (1 when the batch has no such type).
    pub fn sample_counts(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        let index = self.value_index(SAMPLES_COUNT);
        self.samples.iter().map(move |s| match index {
            Some(i) => s.values.get(i).map_or(0, |&v| v.max(0) as u64),
            None => 1,
        })
    }

    /// Total number of events (the sum of [`ProfileBatch::sample_counts`]).
    pub fn total_events(&self) -> u64 {
        self.sample_counts().fold(0, u64::saturating_add)
    }

    /// The event name (`cpu-clock`, `cpu-cycles`).
    pub fn event_name(&self) -> &str {
        self.str(self.event)
    }

    /// Checks that every index points into its table (strings, mappings, frames, stacks),
    /// that string 0 is empty and that each sample has one value per sample type: what
    /// consumers rely on. The error names the first offending item.
    ///
    /// ```
    /// let mut batch = plugin_api::ProfileBatch { strings: vec!["".into()].into(), ..Default::default() };
    /// assert!(batch.check_indices().is_ok());
    /// batch.event = 7;
    /// assert_eq!(batch.check_indices().unwrap_err(), "event: string 7 of 1");
    /// ```
    pub fn check_indices(&self) -> Result<(), String> {
        let below = |what: String, index: u64, table: &str, len: usize| {
            if index < len as u64 {
                Ok(())
            } else {
                Err(format!("{what}: {table} {index} of {len}"))
            }
        };
        let string =
            |what: String, id: StringId| below(what, id.into(), "string", self.strings.len());
        if self.strings.first().is_none_or(|s| !s.is_empty()) {
            return Err("strings: string 0 is not the empty string".into());
        }
        string("event".into(), self.event)?;
        let h = &self.host;
        for (field, id) in [
            ("hostname", h.hostname),
            ("kernel_release", h.kernel_release),
            ("os_release", h.os_release),
            ("arch", h.arch),
        ] {
            string(format!("host.{field}"), id)?;
        }
        for (i, t) in self.sample_types.iter().enumerate() {
            string(format!("sample_types[{i}].kind"), t.kind)?;
            string(format!("sample_types[{i}].unit"), t.unit)?;
        }
        for (i, m) in self.mappings.iter().enumerate() {
            if m.end < m.start {
                return Err(format!(
                    "mappings[{i}]: ends at {:#x}, before its start",
                    m.end
                ));
            }
            string(format!("mappings[{i}].path"), m.path)?;
            string(format!("mappings[{i}].build_id"), m.build_id)?;
        }
        for (i, f) in self.frames.iter().enumerate() {
            if let Some(mapping) = f.mapping.into_option() {
                below(
                    format!("frames[{i}].mapping"),
                    mapping.into(),
                    "mapping",
                    self.mappings.len(),
                )?;
            }
            string(format!("frames[{i}].function"), f.function)?;
            string(format!("frames[{i}].file"), f.file)?;
            string(format!("frames[{i}].runtime"), f.runtime)?;
        }
        for (i, stack) in self.stacks.iter().enumerate() {
            let end = u64::from(stack.offset) + u64::from(stack.len);
            if end > self.stack_frames.len() as u64 {
                return Err(format!(
                    "stacks[{i}]: frames {}..{end} of {}",
                    stack.offset,
                    self.stack_frames.len()
                ));
            }
        }
        for (i, &frame) in self.stack_frames.iter().enumerate() {
            below(
                format!("stack_frames[{i}]"),
                frame.into(),
                "frame",
                self.frames.len(),
            )?;
        }
        for (i, sample) in self.samples.iter().enumerate() {
            below(
                format!("samples[{i}].stack"),
                sample.stack.into(),
                "stack",
                self.stacks.len(),
            )?;
            string(format!("samples[{i}].thread_name"), sample.thread_name)?;
            if sample.values.len() != self.sample_types.len() {
                return Err(format!(
                    "samples[{i}]: {} values for {} sample types",
                    sample.values.len(),
                    self.sample_types.len()
                ));
            }
        }
        for (i, p) in self.processes.iter().enumerate() {
            for (field, id) in [
                ("comm", p.comm),
                ("exe", p.exe),
                ("container_id", p.container_id),
                ("service", p.service),
                ("env", p.env),
                ("version", p.version),
            ] {
                string(format!("processes[{i}].{field}"), id)?;
            }
        }
        Ok(())
    }
}
