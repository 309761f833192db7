//! Batches -> `ExportProfilesServiceRequest` (OTLP profiles, proto v1.10): one shared
//! dictionary per request (entry 0 of every table the empty placeholder), ResourceProfiles
//! grouped per process, container or service, one timestamp per sampled event. Pure: no I/O.

use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{any_value::Value, AnyValue, InstrumentationScope, KeyValue},
    profiles::v1development::{
        Function, KeyValueAndUnit, Line, Location, Mapping, Profile, ProfilesDictionary,
        ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
    },
    resource::v1::Resource,
};
use plugin_api::{FrameKind, ProfileBatch};

use crate::config::GroupBy;

/// Name of the instrumentation scope (this agent).
pub const SCOPE_NAME: &str = "profile-router";

/// The most events one sample stands for in a request (a sample of the probe is one event; a
/// million is beyond any interval's worth of a CPU at the highest frequency).
const MAX_EVENTS_PER_SAMPLE: u64 = 1 << 20;

/// A sample's stack and attributes (thread name, thread id, CPU), as dictionary indices.
type SampleKey = (i32, [i32; 3]);

/// A resource: its attributes and its samples, keyed by (stack, sample attributes).
#[derive(Default)]
struct Group {
    attributes: BTreeMap<&'static str, AttributeValue>,
    samples: HashMap<SampleKey, Vec<u64>>,
    order: Vec<SampleKey>,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum AttributeValue {
    Str(String),
    Int(i64),
}

/// Builds one request from one or more batches.
pub struct RequestBuilder {
    group_by: GroupBy,
    extra_resource: Vec<(String, String)>,
    dictionary: ProfilesDictionary,
    strings: HashMap<String, i32>,
    attributes: HashMap<(i32, AttributeValue), i32>,
    mappings: HashMap<(u32, u64, u64, u64, i32), i32>,
    functions: HashMap<(i32, i32), i32>,
    locations: HashMap<(i32, u64, i32, i64, FrameKind), i32>,
    /// Each distinct stack and its index in the dictionary's stack table, which is filled
    /// from it when the request is finished (a stack is held once).
    stacks: HashMap<Box<[i32]>, i32>,
    groups: BTreeMap<String, Group>,
    start_ns: u64,
    end_ns: u64,
    period_ns: u64,
    batches: usize,
}

impl RequestBuilder {
    /// An empty request; `resource_attributes` go on every resource.
    pub fn new(group_by: GroupBy, resource_attributes: &BTreeMap<String, String>) -> Self {
        let mut b = Self {
            group_by,
            extra_resource: resource_attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            dictionary: ProfilesDictionary::default(),
            strings: HashMap::new(),
            attributes: HashMap::new(),
            mappings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            stacks: HashMap::new(),
            groups: BTreeMap::new(),
            start_ns: u64::MAX,
            end_ns: 0,
            period_ns: 0,
            batches: 0,
        };
        // Entry 0 of every table: the empty placeholder that index 0 ("none") points at.
        b.string("");
        b.dictionary
            .attribute_table
            .push(KeyValueAndUnit::default());
        b.dictionary.mapping_table.push(Mapping::default());
        b.dictionary.location_table.push(Location::default());
        b.dictionary.function_table.push(Function::default());
        b.dictionary.link_table.push(Default::default());
        b
    }

    /// Number of batches added.
    pub fn batch_count(&self) -> usize {
        self.batches
    }

    /// Time range covered, ns since the epoch.
    pub fn time_range(&self) -> (u64, u64) {
        (self.start_ns, self.end_ns)
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.dictionary.string_table.len() as i32;
        self.dictionary.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn attribute(&mut self, key: &str, value: AttributeValue) -> i32 {
        let key = self.string(key);
        if let Some(&i) = self.attributes.get(&(key, value.clone())) {
            return i;
        }
        let i = self.dictionary.attribute_table.len() as i32;
        self.dictionary.attribute_table.push(KeyValueAndUnit {
            key_strindex: key,
            value: Some(any_value(&value)),
            unit_strindex: 0,
        });
        self.attributes.insert((key, value), i);
        i
    }

    /// Adds every sample of `batch`.
    pub fn add_batch(&mut self, batch: &ProfileBatch) {
        self.batches += 1;
        self.start_ns = self.start_ns.min(batch.start_ns);
        self.end_ns = self.end_ns.max(batch.end_ns);
        self.period_ns = batch.period_ns;
        let host = batch.str(batch.host.hostname).to_owned();
        let mut frame_locations = vec![0i32; batch.frames.len()];
        let mut stack_ids = vec![0i32; batch.stacks.len()];
        let mut group_keys: HashMap<u32, String> = HashMap::new();
        for (s, count) in batch.samples.iter().zip(batch.sample_counts()) {
            if stack_ids[s.stack as usize] == 0 {
                let locations: Vec<i32> = batch
                    .stack_frame_ids(s.stack)
                    .iter()
                    .map(|&f| {
                        if frame_locations[f as usize] == 0 {
                            frame_locations[f as usize] = self.location(batch, f);
                        }
                        frame_locations[f as usize]
                    })
                    .collect();
                stack_ids[s.stack as usize] = self.stack(locations);
            }
            let group_key = group_keys
                .entry(s.pid)
                .or_insert_with(|| self.group_key(batch, s.pid))
                .clone();
            let thread_name = self.attribute(
                "thread.name",
                AttributeValue::Str(batch.str(s.thread_name).to_owned()),
            );
            let thread_id = self.attribute("thread.id", AttributeValue::Int(i64::from(s.tid)));
            let cpu = self.attribute("cpu.logical_number", AttributeValue::Int(i64::from(s.cpu)));
            let group = self.groups.entry(group_key).or_default();
            if group.attributes.is_empty() {
                group.attributes = resource_of(batch, s.pid, &host, self.group_by);
            }
            let key = (stack_ids[s.stack as usize], [thread_name, thread_id, cpu]);
            let timestamps = group.samples.entry(key).or_insert_with(|| {
                group.order.push(key);
                Vec::new()
            });
            // One timestamp per event; a count no CPU sample can have (a malformed recording)
            // is capped rather than allowed to exhaust memory.
            let events = count.min(MAX_EVENTS_PER_SAMPLE) as usize;
            timestamps.extend(std::iter::repeat_n(s.timestamp_ns, events));
        }
    }

    fn group_key(&self, batch: &ProfileBatch, pid: u32) -> String {
        let process = batch.process(pid);
        let container = process.map_or("", |p| batch.str(p.container_id));
        match self.group_by {
            GroupBy::Host => String::new(),
            GroupBy::Service => format!("service {}", process.map_or("", |p| batch.str(p.service))),
            GroupBy::Container if !container.is_empty() => format!("container {container}"),
            _ => format!("pid {pid:010}"),
        }
    }

    fn location(&mut self, batch: &ProfileBatch, frame_index: u32) -> i32 {
        let frame = &batch.frames[frame_index as usize];
        let kind = frame.kind;
        let mapping = frame
            .mapping
            .as_ref()
            .into_option()
            .map_or(0, |&m| self.mapping(batch, m));
        let function = if frame.is_symbolized() {
            let name = self.string(batch.str(frame.function));
            let file = self.string(batch.str(frame.file));
            let next = self.dictionary.function_table.len() as i32;
            let id = *self.functions.entry((name, file)).or_insert(next);
            if id == next {
                self.dictionary.function_table.push(Function {
                    name_strindex: name,
                    system_name_strindex: name,
                    filename_strindex: file,
                    start_line: 0,
                });
            }
            id
        } else {
            0
        };
        let key = (
            mapping,
            frame.address,
            function,
            i64::from(frame.line),
            kind,
        );
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let frame_type = self.attribute(
            "profile.frame.type",
            AttributeValue::Str(frame_type(frame.kind, batch.str(frame.runtime)).into()),
        );
        let id = self.dictionary.location_table.len() as i32;
        self.dictionary.location_table.push(Location {
            mapping_index: mapping,
            address: frame.address,
            lines: if function == 0 {
                Vec::new()
            } else {
                vec![Line {
                    function_index: function,
                    line: i64::from(frame.line),
                    column: 0,
                }]
            },
            attribute_indices: vec![frame_type],
        });
        self.locations.insert(key, id);
        id
    }

    fn mapping(&mut self, batch: &ProfileBatch, index: u32) -> i32 {
        let m = &batch.mappings[index as usize];
        let filename = self.string(batch.str(m.path));
        let key = (m.pid, m.start, m.end, m.file_offset, filename);
        if let Some(&id) = self.mappings.get(&key) {
            return id;
        }
        let build_id = batch.str(m.build_id);
        let attribute_indices = if build_id.is_empty() {
            Vec::new()
        } else {
            vec![self.attribute(
                "process.executable.build_id.gnu",
                AttributeValue::Str(build_id.to_owned()),
            )]
        };
        let id = self.dictionary.mapping_table.len() as i32;
        self.dictionary.mapping_table.push(Mapping {
            memory_start: m.start,
            memory_limit: m.end,
            file_offset: m.file_offset,
            filename_strindex: filename,
            attribute_indices,
        });
        self.mappings.insert(key, id);
        id
    }

    fn stack(&mut self, locations: Vec<i32>) -> i32 {
        if let Some(&id) = self.stacks.get(&locations[..]) {
            return id;
        }
        // Index 0 is the table's empty placeholder.
        let id = self.stacks.len() as i32 + 1;
        self.stacks.insert(locations.into_boxed_slice(), id);
        id
    }

    /// The finished request.
    pub fn finish(mut self) -> ExportProfilesServiceRequest {
        let sample_type = ValueType {
            type_strindex: self.string("samples"),
            unit_strindex: self.string("count"),
        };
        let period_type = ValueType {
            type_strindex: self.string("cpu"),
            unit_strindex: self.string("nanoseconds"),
        };
        let stacks = std::mem::take(&mut self.stacks);
        let table = &mut self.dictionary.stack_table;
        table.resize(stacks.len() + 1, Stack::default());
        for (locations, id) in stacks {
            table[id as usize].location_indices = locations.into_vec();
        }
        let groups = std::mem::take(&mut self.groups);
        let resource_profiles = groups
            .into_values()
            .map(|mut group| {
                let samples = group
                    .order
                    .iter()
                    .map(|key| {
                        let timestamps = group.samples.remove(key).unwrap_or_default();
                        Sample {
                            stack_index: key.0,
                            attribute_indices: key.1.to_vec(),
                            link_index: 0,
                            values: Vec::new(),
                            timestamps_unix_nano: timestamps,
                        }
                    })
                    .collect();
                let mut attributes: Vec<KeyValue> = group
                    .attributes
                    .iter()
                    .map(|(k, v)| KeyValue {
                        key: (*k).to_owned(),
                        value: Some(any_value(v)),
                        ..Default::default()
                    })
                    .collect();
                for (k, v) in &self.extra_resource {
                    attributes.retain(|a| a.key != *k);
                    attributes.push(KeyValue {
                        key: k.clone(),
                        value: Some(any_value(&AttributeValue::Str(v.clone()))),
                        ..Default::default()
                    });
                }
                ResourceProfiles {
                    resource: Some(Resource {
                        attributes,
                        ..Default::default()
                    }),
                    scope_profiles: vec![ScopeProfiles {
                        scope: Some(InstrumentationScope {
                            name: SCOPE_NAME.into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        profiles: vec![Profile {
                            sample_type: Some(sample_type),
                            samples,
                            time_unix_nano: self.start_ns,
                            duration_nano: self.end_ns.saturating_sub(self.start_ns),
                            period_type: Some(period_type),
                            period: self.period_ns as i64,
                            ..Default::default()
                        }],
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }
            })
            .collect();
        ExportProfilesServiceRequest {
            resource_profiles,
            dictionary: Some(self.dictionary),
        }
    }
}

/// The resource attributes of the group that `pid` falls in.
fn resource_of(
    batch: &ProfileBatch,
    pid: u32,
    host: &str,
    group_by: GroupBy,
) -> BTreeMap<&'static str, AttributeValue> {
    let mut attributes = BTreeMap::new();
    let mut text = |key: &'static str, value: &str| {
        if !value.is_empty() {
            attributes.insert(key, AttributeValue::Str(value.to_owned()));
        }
    };
    text("host.name", host);
    let process = batch.process(pid);
    let field = |pick: fn(&plugin_api::Process) -> u32| process.map_or("", |p| batch.str(pick(p)));
    let (comm, exe, container) = (
        field(|p| p.comm),
        field(|p| p.exe),
        field(|p| p.container_id),
    );
    let exe_name = exe
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(comm);
    let service = field(|p| p.service);
    let per_process =
        group_by == GroupBy::Process || (group_by == GroupBy::Container && container.is_empty());
    if matches!(group_by, GroupBy::Process | GroupBy::Container) {
        text("container.id", container);
    }
    if group_by != GroupBy::Host {
        text("deployment.environment.name", field(|p| p.env));
        text("service.version", field(|p| p.version));
    }
    let service_name = match group_by {
        GroupBy::Host => format!("unknown_service:{host}"),
        _ if !service.is_empty() => service.to_owned(),
        _ if per_process => format!("unknown_service:{exe_name}"),
        _ => format!("unknown_service:{host}"),
    };
    text("service.name", &service_name);
    if per_process {
        text("process.executable.name", exe_name);
        text("process.executable.path", exe);
        attributes.insert("process.pid", AttributeValue::Int(i64::from(pid)));
    }
    attributes
}

fn any_value(value: &AttributeValue) -> AnyValue {
    AnyValue {
        value: Some(match value {
            AttributeValue::Str(s) => Value::StringValue(s.clone()),
            AttributeValue::Int(i) => Value::IntValue(*i),
        }),
    }
}

/// The `profile.frame.type` of a frame (the values of OpenTelemetry's semantic conventions):
/// `kernel`, `native`, or the runtime of an interpreted or JIT-compiled one (`cpython`,
/// `v8js`, `jvm`); JIT code of an unknown runtime is native code.
pub fn frame_type(kind: FrameKind, runtime: &str) -> &str {
    match (kind, runtime) {
        (FrameKind::Kernel, _) => "kernel",
        (FrameKind::Interpreted | FrameKind::Jit, "v8") => "v8js",
        (FrameKind::Interpreted | FrameKind::Jit, "hotspot") => "jvm",
        (FrameKind::Interpreted | FrameKind::Jit, runtime) if !runtime.is_empty() => runtime,
        _ => "native",
    }
}

#[cfg(test)]
mod tests {
    use plugin_api::fixtures::{synthetic_batch, BatchShape};

    use super::*;

    #[test]
    fn every_index_is_in_range_and_the_stacks_rebuild() {
        let batch = synthetic_batch(BatchShape::BENCH, 1_000);
        let mut b = RequestBuilder::new(GroupBy::Process, &BTreeMap::new());
        b.add_batch(&batch);
        let request = b.finish();
        let d = request.dictionary.as_ref().unwrap();
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.location_table[0], Location::default());
        assert_eq!(
            request.resource_profiles.len(),
            20,
            "one resource per process"
        );
        let mut total = 0;
        for rp in &request.resource_profiles {
            let profile = &rp.scope_profiles[0].profiles[0];
            for s in &profile.samples {
                total += s.timestamps_unix_nano.len();
                let stack = &d.stack_table[s.stack_index as usize];
                assert_eq!(stack.location_indices.len(), 30);
                let root = &d.location_table[*stack.location_indices.last().unwrap() as usize];
                let function = &d.function_table[root.lines[0].function_index as usize];
                assert_eq!(d.string_table[function.name_strindex as usize], "main");
                for a in &s.attribute_indices {
                    assert!((*a as usize) < d.attribute_table.len());
                }
            }
        }
        assert_eq!(total, 10_000);
    }
}
