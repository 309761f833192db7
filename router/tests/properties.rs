//! Properties of the three encoders over arbitrary valid batches (every index in range:
//! `ProfileBatch::check_indices`), each output read back by someone else's tool:
//! - perf.data: the real perfdata plugin in the real router (replay producer) writes one file
//!   per batch, and `perf script` reads every one, with all of its samples;
//! - pprof: the Datadog consumer's encoder, and `go tool pprof` reads every profile;
//! - OTLP: the real OTLP plugin in the real router sends every batch, and the receiver on the
//!   official `opentelemetry-proto` package decodes every request, every dictionary index in
//!   range, with all of the samples.
//!
//! The cases come from proptest; the external tools read them in as few launches as possible,
//! so a failure names the batch (written beside the outputs, which are kept) rather than
//! shrinking it.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, UNIX_EPOCH},
};

use common::{datadog_peer::pprof_raw_total_samples, *};
use consumer_datadog::pprof::PprofBuilder;
use plugin_api::{
    BatchBuilder, Frame, FrameKind, HostInfo, Mapping, Process, ProfileBatch, Sample,
    CPU_NANOSECONDS, SAMPLES_COUNT,
};
use proptest::{
    collection::vec,
    prelude::*,
    sample::{select, Index},
    strategy::ValueTree,
    test_runner::TestRunner,
};

/// Batches per property: each encoder's output for each is read back.
const CASES: usize = 200;

/// Text of any kind but line breaks (the tools' output is read line by line), and the names
/// real batches carry.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[^\r\n]{0,12}",
        1 => select(vec![
            "",
            "main",
            "/usr/bin/python3.11",
            "cpython",
            "v8",
            "samples",
            "count",
            "cpu",
            "nanoseconds",
            "cpu-clock",
            "0123456789abcdef0123456789abcdef01234567",
        ])
        .prop_map(String::from),
    ]
}

/// A GNU build id as the router gives it (lowercase hex), or none.
fn build_id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[0-9a-f]{40}", "[0-9a-f]{2,8}"]
}

fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0x40_0000u64..0x50_0000,
        Just(0),
        Just(u64::MAX)
    ]
}

fn kind() -> impl Strategy<Value = FrameKind> {
    select(vec![
        FrameKind::Kernel,
        FrameKind::Native,
        FrameKind::Interpreted,
        FrameKind::Jit,
        FrameKind::Unknown,
    ])
}

/// A small id (pids, tids, cpus shared between samples and processes) or any.
fn id() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..4, 1 => any::<u32>()]
}

/// The most events one sample stands for (its samples/count value): OTLP spells out one
/// timestamp per event, so a count is memory too.
const MAX_COUNT: i64 = 1000;

/// A sample's event count: mostly one, some none (or negative), some more.
fn sample_count() -> impl Strategy<Value = i64> {
    prop_oneof![6 => Just(1), 2 => -2..=MAX_COUNT]
}

/// Any other sample value (CPU nanoseconds, or a value of another type).
fn sample_value() -> impl Strategy<Value = i64> {
    prop_oneof![Just(10_101_010), -2i64..20, any::<i64>()]
}

/// A mapping: pid, start, end, file offset, path, build id, kernel.
type MappingRecipe = (u32, u64, u64, u64, Index, String, bool);
/// A frame: address, mapping, function, file, line, kind, runtime.
type FrameRecipe = (u64, Option<Index>, Index, Index, u32, FrameKind, Index);
/// A sample: pid, tid, cpu, stack, samples/count value, other values, time offset, thread name.
type SampleRecipe = (u32, u32, u32, Index, i64, Vec<i64>, i64, Index);

/// A batch's parts, every reference an [`Index`] into its table (resolved by [`build`]).
#[derive(Debug, Clone)]
struct Recipe {
    strings: Vec<String>,
    mappings: Vec<MappingRecipe>,
    frames: Vec<FrameRecipe>,
    stacks: Vec<Vec<Index>>,
    /// `None`: the CPU types (samples/count, cpu/nanoseconds).
    sample_types: Option<Vec<(Index, Index)>>,
    samples: Vec<SampleRecipe>,
    processes: Vec<(u32, [Index; 6], bool)>,
    header: (u64, u64, u64, Index, [Index; 4], u32),
}

fn recipe() -> impl Strategy<Value = Recipe> {
    let index = any::<Index>;
    (
        vec(text(), 1..6),
        vec(
            (
                id(),
                address(),
                address(),
                address(),
                index(),
                build_id(),
                any::<bool>(),
            ),
            0..4,
        ),
        vec(
            (
                address(),
                prop::option::of(index()),
                index(),
                index(),
                any::<u32>(),
                kind(),
                index(),
            ),
            1..10,
        ),
        vec(vec(index(), 0..40), 1..6),
        prop::option::weighted(0.2, vec((index(), index()), 0..=3)),
        vec(
            (
                id(),
                id(),
                id(),
                index(),
                sample_count(),
                vec(sample_value(), 3),
                prop_oneof![-20_000_000_000i64..20_000_000_000, any::<i64>()],
                index(),
            ),
            0..30,
        ),
        vec((id(), any::<[Index; 6]>(), any::<bool>()), 0..4),
        (
            prop_oneof![Just(10_101_010u64), any::<u64>()],
            prop_oneof![Just(99u64), any::<u64>()],
            0u64..20_000_000_000,
            index(),
            any::<[Index; 4]>(),
            prop_oneof![Just(2u32), any::<u32>()],
        ),
    )
        .prop_map(
            |(strings, mappings, frames, stacks, sample_types, samples, processes, header)| {
                Recipe {
                    strings,
                    mappings,
                    frames,
                    stacks,
                    sample_types,
                    samples,
                    processes,
                    header,
                }
            },
        )
}

/// The batch of `recipe`, starting at `start_ns`.
fn build(recipe: &Recipe, start_ns: u64) -> ProfileBatch {
    let mut b = BatchBuilder::new();
    let strings: Vec<u32> = recipe.strings.iter().map(|s| b.intern(s)).collect();
    let string = |i: &Index| strings[i.index(strings.len())];
    let mappings: Vec<u32> = recipe
        .mappings
        .iter()
        .map(|(pid, start, end, file_offset, path, build_id, kernel)| {
            let build_id = b.intern(build_id);
            b.mapping(Mapping {
                pid: *pid,
                start: *start.min(end),
                end: *end.max(start),
                file_offset: *file_offset,
                path: string(path),
                build_id,
                kernel: *kernel,
            })
        })
        .collect();
    let frames: Vec<u32> = recipe
        .frames
        .iter()
        .map(|(address, mapping, function, file, line, kind, runtime)| {
            b.frame(Frame {
                address: *address,
                mapping: mapping
                    .filter(|_| !mappings.is_empty())
                    .map(|m| mappings[m.index(mappings.len())])
                    .into(),
                function: string(function),
                file: string(file),
                line: *line,
                kind: *kind,
                runtime: string(runtime),
            })
        })
        .collect();
    let stacks: Vec<u32> = recipe
        .stacks
        .iter()
        .map(|ids| {
            let ids: Vec<u32> = ids.iter().map(|i| frames[i.index(frames.len())]).collect();
            b.stack(&ids)
        })
        .collect();
    let types: Vec<(String, String)> = match &recipe.sample_types {
        None => [SAMPLES_COUNT, CPU_NANOSECONDS]
            .map(|(kind, unit)| (kind.to_owned(), unit.to_owned()))
            .into(),
        Some(types) => {
            let name = |i: &Index| recipe.strings[i.index(recipe.strings.len())].clone();
            types.iter().map(|(k, u)| (name(k), name(u))).collect()
        }
    };
    let type_names: Vec<(&str, &str)> = types
        .iter()
        .map(|(k, u)| (k.as_str(), u.as_str()))
        .collect();
    b.sample_types(&type_names);
    let count_index = type_names.iter().position(|&t| t == SAMPLES_COUNT);
    for (pid, tid, cpu, stack, count, values, offset_ns, thread_name) in &recipe.samples {
        let mut values = values[..types.len()].to_vec();
        if let Some(i) = count_index {
            values[i] = *count;
        }
        b.sample(Sample {
            pid: *pid,
            tid: *tid,
            cpu: *cpu,
            stack: stacks[stack.index(stacks.len())],
            values: values.into(),
            timestamp_ns: start_ns.wrapping_add_signed(*offset_ns),
            thread_name: string(thread_name),
        });
    }
    for (pid, [comm, exe, container_id, service, env, version], inferred) in &recipe.processes {
        b.process(Process {
            pid: *pid,
            comm: string(comm),
            exe: string(exe),
            container_id: string(container_id),
            service: string(service),
            service_inferred: *inferred,
            env: string(env),
            version: string(version),
        });
    }
    let (period_ns, frequency_hz, length_ns, event, [hostname, kernel, os, arch], cpus) =
        &recipe.header;
    let host = HostInfo {
        hostname: string(hostname),
        kernel_release: string(kernel),
        os_release: string(os),
        arch: string(arch),
        cpu_count: *cpus,
    };
    let event = string(event);
    let h = b.header();
    h.start_ns = start_ns;
    h.end_ns = start_ns + length_ns;
    h.period_ns = *period_ns;
    h.frequency_hz = *frequency_hz;
    h.event = event;
    h.host = host;
    let batch = b.finish();
    batch.check_indices().expect("a valid batch");
    batch
}

/// Where batch `n` starts: two minutes after the one before, so that each perf.data file
/// (a new one at least every minute) holds one batch.
fn start_of(n: usize) -> u64 {
    1_790_000_000_000_000_000 + n as u64 * 120_000_000_000
}

/// `CASES` arbitrary valid batches, one after the other in time.
fn arbitrary_batches() -> Vec<ProfileBatch> {
    // The same cases on every run.
    let mut runner = TestRunner::deterministic();
    let recipe = recipe();
    (0..CASES)
        .map(|n| {
            build(
                &recipe.new_tree(&mut runner).unwrap().current(),
                start_of(n),
            )
        })
        .collect()
}

/// A folder for one property's files, kept when the test fails (its path is in the message).
fn workspace(name: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(&format!("properties-{name}-"))
        .tempdir()
        .unwrap()
        .keep();
    println!("{name}: files in {}", dir.display());
    dir
}

/// Writes batch `n` beside its output, for the failure message.
fn keep_batch(dir: &Path, n: usize, batch: &ProfileBatch) -> PathBuf {
    let path = dir.join(format!("batch-{n:03}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(batch).unwrap()).unwrap();
    path
}

fn run(command: &mut Command) -> (bool, String, String) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn perf_script_reads_every_perf_data_file_of_arbitrary_batches() {
    let dir = workspace("perfdata");
    let batches = arbitrary_batches();
    let recording = write_recording(&dir, &batches);
    let out_dir = dir.join("profiles");
    let config = write_config(
        &dir,
        &format!(
            "queue_capacity = {CASES}\n\
             [producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n\
             [consumers.perfdata]\npath = \"{}\"\nretention_count = {CASES}\nretention_bytes = \"1GiB\"\n",
            recording.display(),
            out_dir.display()
        ),
    );
    let log = expect_success(run_with_limit(
        router().arg("--config").arg(config),
        Duration::from_secs(60),
    ));
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let written = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "data")
        })
        .count();
    let mut read = 0;
    for (n, batch) in batches.iter().enumerate() {
        // The consumer's name for the file that starts with the batch.
        let time = UNIX_EPOCH + Duration::from_nanos(batch.start_ns);
        let stamp = humantime::format_rfc3339_millis(time).to_string();
        let file = out_dir.join(format!("perf-{}.data", stamp.replace([':', '-'], "")));
        if !file.exists() && batch.samples.is_empty() {
            continue; // Nothing to write.
        }
        read += 1;
        // One line per sample: its tid (the callchain is read, not printed).
        let (ok, stdout, stderr) = run(Command::new("perf")
            .args(["script", "-F", "tid", "-i"])
            .arg(&file));
        let samples = stdout.lines().filter(|l| !l.trim().is_empty()).count();
        // Every field, callchains resolved through the mappings.
        let (all_fields, _, all_fields_stderr) = run(Command::new("perf")
            .args([
                "script",
                "-F",
                "comm,pid,tid,cpu,time,period,ip,sym,dso",
                "-i",
            ])
            .arg(&file));
        assert!(
            ok && samples == batch.samples.len() && all_fields,
            "perf script read {samples} of {} samples in {}:\n{stderr}{all_fields_stderr}\nthe batch: {}",
            batch.samples.len(),
            file.display(),
            keep_batch(&dir, n, batch).display()
        );
    }
    assert_eq!(
        written,
        read,
        "perf.data files of no batch in {}",
        out_dir.display()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn go_tool_pprof_reads_the_pprof_of_every_arbitrary_batch() {
    let dir = workspace("pprof");
    let batches = arbitrary_batches();
    let files: Vec<PathBuf> = batches
        .iter()
        .enumerate()
        .map(|(n, batch)| {
            let mut builder = PprofBuilder::new();
            builder.add_batch(batch);
            let path = dir.join(format!("batch-{n:03}.pb"));
            std::fs::write(&path, builder.encode()).unwrap();
            path
        })
        .collect();
    // One launch reads them all (merged: every one is parsed and checked first); the total of
    // samples shows that none was skipped.
    let (ok, raw, stderr) = run(Command::new("go")
        .args(["tool", "pprof", "-raw", "-symbolize=none"])
        .args(&files)
        .env("HOME", &dir));
    let expected: u64 = batches.iter().map(ProfileBatch::total_events).sum();
    if !ok || !stderr.trim().is_empty() || pprof_raw_total_samples(&raw) != expected {
        // Name the first profile that go tool pprof does not read by itself.
        for (n, file) in files.iter().enumerate() {
            let (ok, raw, stderr) = run(Command::new("go")
                .args(["tool", "pprof", "-raw", "-symbolize=none"])
                .arg(file)
                .env("HOME", &dir));
            let total = pprof_raw_total_samples(&raw);
            assert!(
                ok && total == batches[n].total_events(),
                "go tool pprof read {total} of {} samples in {}:\n{stderr}\nthe batch: {}",
                batches[n].total_events(),
                file.display(),
                keep_batch(&dir, n, &batches[n]).display()
            );
        }
        panic!("go tool pprof read all profiles one by one, not together:\n{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_official_otlp_proto_decodes_every_request_of_arbitrary_batches() {
    let dir = workspace("otlp");
    let batches = arbitrary_batches();
    let recording = write_recording(&dir, &batches);
    let receiver = otlp_peer::Receiver::start(&dir, 0);
    // One consumer per grouping, each named in a header of its requests.
    let groupings = ["process", "container", "service", "host"];
    let consumers: String = groupings
        .iter()
        .map(|group_by| {
            format!(
                "[consumers.otlp_{group_by}]\nplugin = \"libconsumer_otlp.so\"\n\
                 endpoint = \"http://127.0.0.1:{}\"\ngroup_by = \"{group_by}\"\n\
                 max_queue = {CASES}\nheaders = {{ x-grouping = \"{group_by}\" }}\n\
                 resource_attributes = {{ \"deployment.environment\" = \"test\" }}\n",
                receiver.grpc_port
            )
        })
        .collect();
    let config = write_config(
        &dir,
        &format!(
            "queue_capacity = {CASES}\n\
             [producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n{consumers}",
            recording.display()
        ),
    );
    expect_success(run_with_limit(
        router().arg("--config").arg(config),
        Duration::from_secs(60),
    ));
    let batch_at = |time_unix_nano: &serde_json::Value| {
        let n = batches.iter().position(|b| time_unix_nano == b.start_ns);
        n.map_or("none".into(), |n| {
            keep_batch(&dir, n, &batches[n]).display().to_string()
        })
    };
    let mut timestamps: BTreeMap<String, u64> = BTreeMap::new();
    for request in receiver.requests() {
        let resources = request["resources"].as_array().unwrap();
        let placeholders = request["placeholders"].as_object().unwrap();
        assert!(
            request["errors"].as_array().unwrap().is_empty()
                && placeholders.values().all(|ok| ok == true),
            "{request}\nthe batch: {}",
            batch_at(&resources[0]["time_unix_nano"])
        );
        *timestamps
            .entry(
                request["headers"]["x-grouping"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
            .or_default() += resources
            .iter()
            .flat_map(|r| r["samples"].as_array().unwrap())
            .map(|s| s["timestamps"].as_array().unwrap().len() as u64)
            .sum::<u64>();
    }
    let expected: u64 = batches.iter().map(ProfileBatch::total_events).sum();
    for group_by in groupings {
        assert_eq!(
            timestamps.get(group_by),
            Some(&expected),
            "grouped by {group_by}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_batches_are_arbitrary_enough() {
    let batches = arbitrary_batches();
    let count = |what: &dyn Fn(&ProfileBatch) -> bool| batches.iter().filter(|b| what(b)).count();
    let cpu_types = |b: &ProfileBatch| {
        b.value_index(SAMPLES_COUNT) == Some(0) && b.value_index(CPU_NANOSECONDS) == Some(1)
    };
    for (what, n) in [
        ("no samples", count(&|b| b.samples.is_empty())),
        ("other sample types", count(&|b| !cpu_types(b))),
        (
            "an empty stack",
            count(&|b| b.stacks.iter().any(|s| s.len == 0)),
        ),
        (
            "a kernel mapping",
            count(&|b| b.mappings.iter().any(|m| m.kernel)),
        ),
        (
            "an interpreted frame",
            count(&|b| b.frames.iter().any(|f| f.kind == FrameKind::Interpreted)),
        ),
        (
            "a sample of a known process",
            count(&|b| b.samples.iter().any(|s| b.process(s.pid).is_some())),
        ),
        ("more than 10 samples", count(&|b| b.samples.len() > 10)),
    ] {
        assert!(n >= CASES / 50, "{what}: {n} of {CASES} batches");
    }
}
