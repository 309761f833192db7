//! [`BatchBuilder`]: builds a [`ProfileBatch`], interning every table on the way.

use std::collections::HashMap;

use abi_stable::std_types::{ROption, RString, RVec};

use crate::model::*;

/// Builds a [`ProfileBatch`]; strings, mappings, frames and stacks are stored once each.
///
/// ```
/// use plugin_api::{BatchBuilder, FrameKind, Sample};
/// let mut b = BatchBuilder::new();
/// let f = b.frame_symbolized(0x401000, None, "main", FrameKind::Native);
/// let stack = b.stack(&[f]);
/// let comm = b.intern("app");
/// b.cpu_sample_types();
/// b.sample(Sample { pid: 7, tid: 7, stack, values: vec![1, 10_101_010].into(), thread_name: comm, ..Default::default() });
/// let batch = b.finish();
/// assert_eq!(batch.total_events(), 1);
/// assert_eq!(batch.stacks.len(), 1);
/// ```
#[derive(Default)]
pub struct BatchBuilder {
    batch: ProfileBatch,
    string_ids: HashMap<String, StringId>,
    mapping_ids: HashMap<Mapping, u32>,
    frame_ids: HashMap<Frame, u32>,
    stack_ids: HashMap<Vec<u32>, u32>,
}

impl BatchBuilder {
    /// An empty builder; string 0 is already the empty string.
    pub fn new() -> Self {
        let mut builder = Self::default();
        builder.intern("");
        builder
    }

    /// Mutable access to the batch header (times, period, host, loss counters).
    pub fn header(&mut self) -> &mut ProfileBatch {
        &mut self.batch
    }

    /// The id of `s`, adding it to the string table when new.
    pub fn intern(&mut self, s: &str) -> StringId {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.batch.strings.len() as StringId;
        self.batch.strings.push(RString::from(s));
        self.string_ids.insert(s.to_owned(), id);
        id
    }

    /// The id of `s` when there is one, else 0 (the empty string: "unknown").
    pub fn intern_optional(&mut self, s: Option<&str>) -> StringId {
        s.map_or(0, |s| self.intern(s))
    }

    /// Declares the batch's value types (see [`ProfileBatch::sample_types`]).
    pub fn sample_types(&mut self, types: &[(&str, &str)]) {
        let types: Vec<ValueType> = types
            .iter()
            .map(|&(kind, unit)| ValueType {
                kind: self.intern(kind),
                unit: self.intern(unit),
            })
            .collect();
        self.batch.sample_types = RVec::from(types);
    }

    /// Declares a CPU batch's value types: [`SAMPLES_COUNT`], then [`CPU_NANOSECONDS`].
    pub fn cpu_sample_types(&mut self) {
        self.sample_types(&[SAMPLES_COUNT, CPU_NANOSECONDS]);
    }

    /// The index of `mapping`, adding it when new.
    pub fn mapping(&mut self, mapping: Mapping) -> u32 {
        let mappings = &mut self.batch.mappings;
        *self.mapping_ids.entry(mapping).or_insert_with_key(|m| {
            mappings.push(m.clone());
            (mappings.len() - 1) as u32
        })
    }

    /// The index of `frame`, adding it when new.
    pub fn frame(&mut self, frame: Frame) -> u32 {
        let frames = &mut self.batch.frames;
        *self.frame_ids.entry(frame).or_insert_with_key(|f| {
            frames.push(f.clone());
            (frames.len() - 1) as u32
        })
    }

    /// Shorthand for a symbolized frame with no source line.
    pub fn frame_symbolized(
        &mut self,
        address: u64,
        mapping: Option<u32>,
        function: &str,
        kind: FrameKind,
    ) -> u32 {
        let function = self.intern(function);
        self.frame(Frame {
            address,
            mapping: ROption::from(mapping),
            function,
            kind,
            ..Default::default()
        })
    }

    /// The index of the stack made of `frames` (leaf first), adding it when new.
    pub fn stack(&mut self, frames: &[u32]) -> u32 {
        if let Some(&id) = self.stack_ids.get(frames) {
            return id;
        }
        let id = self.batch.stacks.len() as u32;
        self.batch.stacks.push(Stack {
            offset: self.batch.stack_frames.len() as u32,
            len: frames.len() as u32,
        });
        self.batch.stack_frames.extend_from_slice(frames);
        self.stack_ids.insert(frames.to_vec(), id);
        id
    }

    /// Appends a sample.
    pub fn sample(&mut self, sample: Sample) {
        self.batch.samples.push(sample);
    }

    /// Records a process (the last record for a pid wins).
    pub fn process(&mut self, process: Process) {
        self.batch.processes.push(process);
    }

    /// Number of samples so far.
    pub fn sample_count(&self) -> usize {
        self.batch.samples.len()
    }

    /// The finished batch: samples in time order, processes sorted by pid.
    pub fn finish(mut self) -> ProfileBatch {
        self.batch.samples.sort_by_key(|s| s.timestamp_ns);
        let mut processes: Vec<Process> = self.batch.processes.into_iter().collect();
        processes.reverse();
        processes.sort_by_key(|p| p.pid);
        processes.dedup_by_key(|p| p.pid);
        self.batch.processes = RVec::from(processes);
        self.batch
    }
}
