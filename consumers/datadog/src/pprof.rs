//! The pprof `profile.proto` messages (github.com/google/pprof, proto/profile.proto), as prost
//! structs, and the conversion from batches: a pure function from batches to bytes.

use std::collections::HashMap;

use plugin_api::{Frame, ProfileBatch, CPU_NANOSECONDS};

/// The field number of `Profile::sample`.
const SAMPLE_TAG: u32 = 2;

/// `perftools.profiles.Profile`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    /// What each value of a sample measures.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The samples.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// Mappings referenced by locations.
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    /// Locations referenced by samples.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// Functions referenced by lines.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// The string table; entry 0 is "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// Start of the profile, ns since the epoch.
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    /// Length of the profile, ns.
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    /// What the period measures.
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    /// The sampling period.
    #[prost(int64, tag = "12")]
    pub period: i64,
    /// The sample type a viewer shows first (`cpu-time`), string table index.
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `ValueType`: a type and unit, as string table indices.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ValueType {
    /// Type, e.g. "cpu-samples".
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// Unit, e.g. "count".
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Location ids, leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Labels.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `Label`: a string or a number.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Label {
    /// Key, string table index.
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String value, string table index.
    #[prost(int64, tag = "2")]
    pub str: i64,
    /// Numeric value.
    #[prost(int64, tag = "3")]
    pub num: i64,
    /// Unit of the numeric value.
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// `Mapping`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    /// Id, 1-based.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// First address.
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    /// One past the last address.
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    /// File offset of `memory_start`.
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    /// File name, string table index.
    #[prost(int64, tag = "5")]
    pub filename: i64,
    /// Build id, string table index.
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    /// Whether locations in it carry function names.
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
}

/// `Location`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    /// Id, 1-based.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Mapping id, 0 when none.
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    /// Instruction address.
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// The function (and line) at this address.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// `Line`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Line {
    /// Function id.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// Source line, 0 when unknown.
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// `Function`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    /// Id, 1-based.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Name, string table index.
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// System name, string table index.
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// Source file, string table index.
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Merges batches into one pprof profile, interning every table once. Samples are kept
/// compact until the profile is encoded (stacks interned, labels as numbers): a busy host
/// makes a hundred thousand samples a minute, which as pprof messages took 40 MB.
pub struct PprofBuilder {
    /// Every table but the samples.
    profile: Profile,
    samples: Vec<CompactSample>,
    /// Each distinct stack (location ids, leaf first, the executable's root last) and its index.
    stacks: HashMap<Box<[u64]>, u32>,
    strings: HashMap<String, i64>,
    mappings: HashMap<(u32, u64, u64, u64, i64), u64>,
    functions: HashMap<(i64, i64), u64>,
    locations: HashMap<(u64, u64, u64, i64), u64>,
    /// The synthetic root location of each executable (or `kernel`), by name.
    roots: HashMap<(i64, i64), u64>,
    keys: LabelKeys,
    start_ns: u64,
    end_ns: u64,
    unsymbolized: bool,
}

/// A sample until it is encoded: string-table ids and numbers only.
struct CompactSample {
    stack: u32,
    pid: u32,
    tid: u32,
    cpu: u32,
    thread_name: i64,
    process_name: i64,
    container: i64,
    timestamp_ns: u64,
    count: i64,
    time: i64,
}

/// String ids of the label keys, interned once.
struct LabelKeys {
    process_id: i64,
    thread_id: i64,
    thread_name: i64,
    process_name: i64,
    cpu: i64,
    container_id: i64,
    timestamp_ns: i64,
    nanoseconds: i64,
}

impl Default for PprofBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PprofBuilder {
    /// An empty profile with Datadog's CPU sample types.
    pub fn new() -> Self {
        let mut b = PprofBuilder {
            profile: Profile::default(),
            samples: Vec::new(),
            stacks: HashMap::new(),
            strings: HashMap::new(),
            mappings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            roots: HashMap::new(),
            keys: LabelKeys {
                process_id: 0,
                thread_id: 0,
                thread_name: 0,
                process_name: 0,
                cpu: 0,
                container_id: 0,
                timestamp_ns: 0,
                nanoseconds: 0,
            },
            start_ns: u64::MAX,
            end_ns: 0,
            unsymbolized: false,
        };
        b.intern("");
        let samples = ValueType {
            r#type: b.intern("cpu-samples"),
            unit: b.intern("count"),
        };
        let time = ValueType {
            r#type: b.intern("cpu-time"),
            unit: b.intern("nanoseconds"),
        };
        b.profile.sample_type = vec![samples, time];
        b.profile.period_type = Some(time);
        b.profile.default_sample_type = time.r#type;
        b.keys = LabelKeys {
            process_id: b.intern("process_id"),
            thread_id: b.intern("thread id"),
            thread_name: b.intern("thread name"),
            process_name: b.intern("process name"),
            cpu: b.intern("cpu"),
            container_id: b.intern("container_id"),
            timestamp_ns: b.intern("timestamp_ns"),
            nanoseconds: b.intern("nanoseconds"),
        };
        b
    }

    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.strings.get(s) {
            return id;
        }
        let id = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), id);
        id
    }

    /// Number of samples so far.
    pub fn sample_count(&self) -> usize {
        self.samples.len()
    }

    /// Whether any frame was left for the backend to symbolize (`remote_symbols:yes`).
    pub fn has_unsymbolized_frames(&self) -> bool {
        self.unsymbolized
    }

    /// Time range covered, ns since the epoch.
    pub fn time_range(&self) -> (u64, u64) {
        (self.start_ns, self.end_ns)
    }

    /// Adds every sample of `batch`.
    pub fn add_batch(&mut self, batch: &ProfileBatch) {
        self.add_samples(batch, |_| true);
    }

    /// Adds the samples of `batch` whose process `wanted` accepts (by pid). Each sample's
    /// stack ends, at its root, in a frame naming its executable (or `kernel` for a kernel
    /// thread), which is how Datadog's flame graphs group a host's processes.
    pub fn add_samples(&mut self, batch: &ProfileBatch, wanted: impl Fn(u32) -> bool) {
        self.start_ns = self.start_ns.min(batch.start_ns);
        self.end_ns = self.end_ns.max(batch.end_ns);
        self.profile.period = batch.period_ns as i64;
        // Per batch: frame index -> location id, (stack index, root) -> interned stack.
        let mut frame_locations: Vec<u64> = vec![0; batch.frames.len()];
        let mut stacks: HashMap<(u32, u64), u32> = HashMap::new();
        let mut process_names: HashMap<u32, (i64, i64, u64)> = HashMap::new();
        let cpu_time = batch.value_index(CPU_NANOSECONDS);
        for (s, count) in batch
            .samples
            .iter()
            .zip(batch.sample_counts())
            .filter(|(s, _)| wanted(s.pid))
        {
            let (process_name, container, root) =
                *process_names.entry(s.pid).or_insert_with(|| {
                    let process = batch.process(s.pid);
                    let exe = process.map_or("", |p| batch.str(p.exe));
                    let comm = process.map_or("", |p| batch.str(p.comm));
                    let (name, file) = match exe.rsplit('/').next() {
                        Some(base) if !base.is_empty() => (base, exe),
                        _ if s.pid == 0 || comm.is_empty() => ("kernel", "kernel"),
                        _ => (comm, comm),
                    };
                    let container = process.map_or("", |p| batch.str(p.container_id));
                    let name = self.intern(name);
                    let file = self.intern(file);
                    let root = self.root_location(name, file);
                    (name, self.intern(container), root)
                });
            let stack = match stacks.get(&(s.stack, root)) {
                Some(&stack) => stack,
                None => {
                    let mut ids: Vec<u64> = batch
                        .stack_frame_ids(s.stack)
                        .iter()
                        .map(|&f| {
                            if frame_locations[f as usize] == 0 {
                                frame_locations[f as usize] =
                                    self.location(batch, &batch.frames[f as usize]);
                            }
                            frame_locations[f as usize]
                        })
                        .collect();
                    ids.push(root);
                    let next = self.stacks.len() as u32;
                    let stack = *self.stacks.entry(ids.into()).or_insert(next);
                    stacks.insert((s.stack, root), stack);
                    stack
                }
            };
            let count = count as i64;
            let time = match cpu_time.and_then(|i| s.values.get(i)) {
                Some(&nanoseconds) => nanoseconds,
                None => count * batch.period_ns as i64,
            };
            let thread_name = self.intern(batch.str(s.thread_name));
            self.samples.push(CompactSample {
                stack,
                pid: s.pid,
                tid: s.tid,
                cpu: s.cpu,
                thread_name,
                process_name,
                container,
                timestamp_ns: s.timestamp_ns,
                count,
                time,
            });
        }
    }

    /// The pprof message of sample `s`, with its labels.
    fn sample(&self, s: &CompactSample, stacks: &[&[u64]]) -> Sample {
        let k = &self.keys;
        let number = |key: i64, num: i64| Label {
            key,
            num,
            ..Default::default()
        };
        let text = |key: i64, str: i64| Label {
            key,
            str,
            ..Default::default()
        };
        let mut label = vec![
            number(k.process_id, i64::from(s.pid)),
            number(k.thread_id, i64::from(s.tid)),
            text(k.thread_name, s.thread_name),
            text(k.process_name, s.process_name),
            number(k.cpu, i64::from(s.cpu)),
            Label {
                num_unit: k.nanoseconds,
                ..number(k.timestamp_ns, s.timestamp_ns as i64)
            },
        ];
        if s.container != 0 {
            label.push(text(k.container_id, s.container));
        }
        Sample {
            location_id: stacks[s.stack as usize].to_vec(),
            value: vec![s.count, s.time],
            label,
        }
    }

    fn location(&mut self, batch: &ProfileBatch, frame: &Frame) -> u64 {
        let mapping_id = match frame.mapping.as_ref().into_option() {
            Some(&m) => self.mapping(batch, m, frame.is_symbolized()),
            None => 0,
        };
        let name = if frame.is_symbolized() {
            self.intern(batch.str(frame.function))
        } else {
            self.unsymbolized = true;
            self.intern(&format!("{:#x}", frame.address))
        };
        let file = self.intern(batch.str(frame.file));
        let key = (mapping_id, frame.address, u64::from(frame.line), name);
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let function_id = self.function(name, file);
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id,
            address: frame.address,
            line: vec![Line {
                function_id,
                line: i64::from(frame.line),
            }],
        });
        self.locations.insert(key, id);
        id
    }

    /// The id of function `name` in `file`, added on first use.
    fn function(&mut self, name: i64, file: i64) -> u64 {
        *self.functions.entry((name, file)).or_insert_with(|| {
            let id = self.profile.function.len() as u64 + 1;
            self.profile.function.push(Function {
                id,
                name,
                system_name: name,
                filename: file,
            });
            id
        })
    }

    /// The location of the synthetic root frame `name` (file `file`).
    fn root_location(&mut self, name: i64, file: i64) -> u64 {
        if let Some(&id) = self.roots.get(&(name, file)) {
            return id;
        }
        let function_id = self.function(name, file);
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id: 0,
            address: 0,
            line: vec![Line {
                function_id,
                line: 0,
            }],
        });
        self.roots.insert((name, file), id);
        id
    }

    fn mapping(&mut self, batch: &ProfileBatch, index: u32, symbolized: bool) -> u64 {
        let m = &batch.mappings[index as usize];
        let filename = self.intern(batch.str(m.path));
        let key = (m.pid, m.start, m.end, m.file_offset, filename);
        if let Some(&id) = self.mappings.get(&key) {
            if symbolized {
                self.profile.mapping[id as usize - 1].has_functions = true;
            }
            return id;
        }
        let build_id = self.intern(batch.str(m.build_id));
        let id = self.profile.mapping.len() as u64 + 1;
        self.profile.mapping.push(Mapping {
            id,
            memory_start: m.start,
            memory_limit: m.end,
            file_offset: m.file_offset,
            filename,
            build_id,
            has_functions: symbolized,
        });
        self.mappings.insert(key, id);
        id
    }

    /// The encoded (uncompressed) pprof. The samples are encoded one at a time after the
    /// other tables (a message's fields may come in any order), so that they never all exist
    /// as messages at once.
    pub fn encode(mut self) -> Vec<u8> {
        self.profile.time_nanos = self.start_ns as i64;
        self.profile.duration_nanos = self.end_ns.saturating_sub(self.start_ns) as i64;
        let mut stacks: Vec<&[u64]> = vec![&[]; self.stacks.len()];
        for (ids, &i) in &self.stacks {
            stacks[i as usize] = ids;
        }
        let mut bytes = prost::Message::encode_to_vec(&self.profile);
        for s in &self.samples {
            prost::encoding::message::encode(SAMPLE_TAG, &self.sample(s, &stacks), &mut bytes);
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use plugin_api::fixtures::{function_name, synthetic_batch, BatchShape};
    use prost::Message;

    use super::*;

    #[test]
    fn conversion_keeps_every_sample_and_names_every_frame() {
        let batch = synthetic_batch(BatchShape::BENCH, 1_000_000);
        let mut b = PprofBuilder::new();
        b.add_batch(&batch);
        let bytes = b.encode();
        let p = Profile::decode(&bytes[..]).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        assert_eq!(p.sample.len(), 10_000);
        let total: i64 = p.sample.iter().map(|x| x.value[0]).sum();
        assert_eq!(total, 10_000);
        assert_eq!(p.sample[0].value[1], batch.period_ns as i64);
        assert_eq!(
            (s(p.sample_type[0].r#type), s(p.sample_type[0].unit)),
            ("cpu-samples", "count")
        );
        assert_eq!(
            (s(p.sample_type[1].r#type), s(p.sample_type[1].unit)),
            ("cpu-time", "nanoseconds")
        );
        assert_eq!(p.period, batch.period_ns as i64);
        assert_eq!(s(p.default_sample_type), "cpu-time");
        let executables: std::collections::HashSet<&str> = batch
            .processes
            .iter()
            .map(|p| batch.str(p.exe).rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            p.location.len(),
            batch.frames.len() + executables.len(),
            "one location per distinct frame, and a root per executable"
        );
        let mut unique: Vec<&String> = p.string_table.iter().collect();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            p.string_table.len(),
            "string table deduplicated"
        );
        // The leaf-most user frame of stack 0, and main at the root.
        let first = &p.sample[0];
        let name_of = |loc: u64| {
            let l = &p.location[loc as usize - 1];
            s(p.function[l.line[0].function_id as usize - 1].name)
        };
        let process = batch.process(batch.samples[0].pid).unwrap();
        let executable = batch.str(process.exe).rsplit('/').next().unwrap();
        assert_eq!(name_of(*first.location_id.last().unwrap()), executable);
        assert_eq!(
            name_of(first.location_id[first.location_id.len() - 2]),
            "main"
        );
        assert_eq!(name_of(first.location_id[5]), function_name(0, 5, 30));
        let kernel_mapping =
            &p.mapping[p.location[first.location_id[0] as usize - 1].mapping_id as usize - 1];
        assert_eq!(s(kernel_mapping.filename), "[kernel.kallsyms]");
        assert!(p.time_nanos > 0 && p.duration_nanos == 10_000_000_000);
    }
}
