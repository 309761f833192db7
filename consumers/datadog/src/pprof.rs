//! The pprof `profile.proto` messages (github.com/google/pprof, proto/profile.proto), as prost
//! structs, and the conversion from batches: a pure function from batches to bytes.

use std::{
    collections::HashMap,
    io::{self, Write},
};

use plugin_api::{Frame, ProfileBatch, CPU_NANOSECONDS};

use crate::interned::SliceTable;

/// The field numbers of `Profile::sample`, `Profile::location` and `Profile::string_table`.
const SAMPLE_TAG: u32 = 2;
const LOCATION_TAG: u32 = 4;
const STRING_TAG: u32 = 6;

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

/// Merges batches into one pprof profile, interning every table once. Samples, locations and
/// strings are kept compact until the profile is encoded (stacks and strings interned end to
/// end, labels as numbers): a busy host makes a hundred thousand samples a minute, which as
/// pprof messages took 40 MB.
pub struct PprofBuilder {
    /// The mappings, functions and the profile's own fields.
    profile: Profile,
    samples: Vec<CompactSample>,
    /// Each distinct stack: location ids, leaf first, the executable's root last.
    stacks: SliceTable<u32>,
    /// The string table, as UTF-8 bytes; entry 0 is "".
    strings: SliceTable<u8>,
    /// The locations; location id `n` is entry `n - 1`.
    location_table: Vec<CompactLocation>,
    mappings: HashMap<(u32, u64, u64, u64, i64), u64>,
    functions: HashMap<(i64, i64), u64>,
    /// Location ids by (mapping id, address, line, function name).
    locations: HashMap<(u32, u64, u32, u32), u32>,
    /// The synthetic root location of each executable (or `kernel`), by name.
    roots: HashMap<(i64, i64), u32>,
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
    thread_name: u32,
    process_name: u32,
    container: u32,
    count: u32,
    timestamp_ns: u64,
    time: i64,
}

/// A location until it is encoded.
struct CompactLocation {
    mapping_id: u32,
    function_id: u32,
    line: u32,
    address: u64,
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
            stacks: SliceTable::default(),
            strings: SliceTable::default(),
            location_table: Vec::new(),
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
        i64::from(self.strings.intern(s.as_bytes()))
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
        let mut frame_locations: Vec<u32> = vec![0; batch.frames.len()];
        let mut stacks: HashMap<(u32, u32), u32> = HashMap::new();
        let mut process_names: HashMap<u32, (i64, i64, u32)> = HashMap::new();
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
                    let mut ids: Vec<u32> = batch
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
                    let stack = self.stacks.intern(&ids);
                    stacks.insert((s.stack, root), stack);
                    stack
                }
            };
            let time = match cpu_time.and_then(|i| s.values.get(i)) {
                Some(&nanoseconds) => nanoseconds,
                None => (count as i64).saturating_mul(batch.period_ns as i64),
            };
            let thread_name = self.strings.intern(batch.str(s.thread_name).as_bytes());
            self.samples.push(CompactSample {
                stack,
                pid: s.pid,
                tid: s.tid,
                cpu: s.cpu,
                thread_name,
                process_name: process_name as u32,
                container: container as u32,
                count: count.min(u64::from(u32::MAX)) as u32,
                timestamp_ns: s.timestamp_ns,
                time,
            });
        }
    }

    /// The pprof message of sample `s`, with its labels.
    fn sample(&self, s: &CompactSample) -> Sample {
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
            text(k.thread_name, s.thread_name.into()),
            text(k.process_name, s.process_name.into()),
            number(k.cpu, i64::from(s.cpu)),
            Label {
                num_unit: k.nanoseconds,
                ..number(k.timestamp_ns, s.timestamp_ns as i64)
            },
        ];
        if s.container != 0 {
            label.push(text(k.container_id, s.container.into()));
        }
        Sample {
            location_id: self
                .stacks
                .get(s.stack)
                .iter()
                .map(|&id| id.into())
                .collect(),
            value: vec![s.count.into(), s.time],
            label,
        }
    }

    fn location(&mut self, batch: &ProfileBatch, frame: &Frame) -> u32 {
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
        let key = (mapping_id as u32, frame.address, frame.line, name as u32);
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let function_id = self.function(name, file);
        let id = self.add_location(mapping_id, frame.address, function_id, frame.line);
        self.locations.insert(key, id);
        id
    }

    /// A new location; returns its id.
    fn add_location(&mut self, mapping_id: u64, address: u64, function_id: u64, line: u32) -> u32 {
        self.location_table.push(CompactLocation {
            mapping_id: mapping_id as u32,
            function_id: function_id as u32,
            line,
            address,
        });
        self.location_table.len() as u32
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
    fn root_location(&mut self, name: i64, file: i64) -> u32 {
        if let Some(&id) = self.roots.get(&(name, file)) {
            return id;
        }
        let function_id = self.function(name, file);
        let id = self.add_location(0, 0, function_id, 0);
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

    /// The encoded (uncompressed) pprof.
    pub fn encode(self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.encode_to(&mut bytes)
            .expect("writing into memory cannot fail");
        bytes
    }

    /// Writes the encoded pprof to `out` (a compressor): the profile's own fields, mappings
    /// and functions, then the strings, the locations and the samples one at a time (a
    /// message's fields may come in any order), so that they never all exist as messages,
    /// nor the profile as one buffer.
    pub fn encode_to(mut self, out: &mut impl Write) -> io::Result<()> {
        use prost::encoding::{encode_key, encode_varint, message, WireType};
        self.profile.time_nanos = self.start_ns as i64;
        self.profile.duration_nanos = self.end_ns.saturating_sub(self.start_ns) as i64;
        out.write_all(&prost::Message::encode_to_vec(&self.profile))?;
        let mut bytes = Vec::new();
        for string in self.strings.iter() {
            bytes.clear();
            encode_key(STRING_TAG, WireType::LengthDelimited, &mut bytes);
            encode_varint(string.len() as u64, &mut bytes);
            bytes.extend_from_slice(string);
            out.write_all(&bytes)?;
        }
        for (l, id) in self.location_table.iter().zip(1..) {
            let location = Location {
                id,
                mapping_id: l.mapping_id.into(),
                address: l.address,
                line: vec![Line {
                    function_id: l.function_id.into(),
                    line: l.line.into(),
                }],
            };
            bytes.clear();
            message::encode(LOCATION_TAG, &location, &mut bytes);
            out.write_all(&bytes)?;
        }
        for s in &self.samples {
            bytes.clear();
            message::encode(SAMPLE_TAG, &self.sample(s), &mut bytes);
            out.write_all(&bytes)?;
        }
        Ok(())
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
