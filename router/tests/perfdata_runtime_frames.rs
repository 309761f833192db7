//! Python and JIT frames in the perf.data consumer's files, read back by the host's `perf`:
//! their names come from the companion `.runtime.elf` symbol file, native frames still resolve
//! from the binary, and retention deletes the companion with its perf.data.

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use plugin_api::{
    BatchBuilder, Frame, FrameKind, HostInfo, Mapping, Process, ProfileBatch, Sample,
};

const LIMIT: Duration = Duration::from_secs(120);
const BASE: u64 = 0x5555_5555_4000;
const START_NS: u64 = 1_790_000_000_000_000_000;
/// Pids no live process has (above the default pid_max of 4194304), so that perf looks for
/// nothing in another process's namespaces.
const PYTHON_PID: u32 = 4_194_400;
const NODE_PID: u32 = 4_194_500;

/// What perf must print for the Python process's stack, leaf first.
const PYTHON_CHAIN: [&str; 6] = [
    "inner_spin",
    "leaf (/srv/app/chain.py:10)",
    "mid (/srv/app/chain.py:15)",
    "outer (/srv/app/chain.py:20)",
    "outer_work",
    "main",
];
/// And for the Node process's.
const NODE_CHAIN: [&str; 3] = ["JS:*hotLoop", "outer_work", "main"];

/// One 10 s batch per start: a Python process whose interpreter (the spin binary, standing in
/// for python3) runs `outer` < `mid` < `leaf` of chain.py, the leaf calling native code; a Node
/// process running a V8-optimized `hotLoop`. 50 samples each.
fn runtime_batches(
    binary: &Path,
    symbols: &HashMap<String, u64>,
    starts: &[u64],
) -> Vec<ProfileBatch> {
    starts
        .iter()
        .map(|&start_ns| {
            let mut b = BatchBuilder::new();
            let path = b.intern(&binary.display().to_string());
            let native = |b: &mut BatchBuilder, pid: u32, name: &str| {
                let mapping = b.mapping(Mapping {
                    pid,
                    start: BASE,
                    end: BASE + 0x10_0000,
                    file_offset: 0,
                    path,
                    ..Default::default()
                });
                b.frame_symbolized(
                    BASE + symbols[name] + 4,
                    Some(mapping),
                    name,
                    FrameKind::Native,
                )
            };
            let (cpython, v8) = (b.intern("cpython"), b.intern("v8"));
            let chain_py = b.intern("/srv/app/chain.py");
            let python = |b: &mut BatchBuilder, name: &str, line: u32, code_object: u64| {
                let function = b.intern(name);
                b.frame(Frame {
                    address: code_object,
                    mapping: None.into(),
                    function,
                    file: chain_py,
                    line,
                    kind: FrameKind::Interpreted,
                    runtime: cpython,
                })
            };
            let python_stack = [
                native(&mut b, PYTHON_PID, "inner_spin"),
                python(&mut b, "leaf", 10, 0x7f3a_1c2b_4e30),
                python(&mut b, "mid", 15, 0x7f3a_1c2b_5a70),
                python(&mut b, "outer", 20, 0x7f3a_1c2b_61b0),
                native(&mut b, PYTHON_PID, "outer_work"),
                native(&mut b, PYTHON_PID, "main"),
            ];
            let hot_loop = b.intern("JS:*hotLoop");
            let jit = b.frame(Frame {
                address: 0x3e6f_0004_4a2c,
                mapping: None.into(),
                function: hot_loop,
                kind: FrameKind::Jit,
                runtime: v8,
                ..Default::default()
            });
            let node_stack = [
                jit,
                native(&mut b, NODE_PID, "outer_work"),
                native(&mut b, NODE_PID, "main"),
            ];
            let stacks = [b.stack(&python_stack), b.stack(&node_stack)];
            let comms = [b.intern("python3"), b.intern("node")];
            for (i, pid) in [PYTHON_PID, NODE_PID].into_iter().enumerate() {
                b.process(Process {
                    pid,
                    comm: comms[i],
                    exe: path,
                    ..Default::default()
                });
            }
            for i in 0..100u64 {
                let which = (i % 2) as usize;
                let pid = [PYTHON_PID, NODE_PID][which];
                b.sample(Sample {
                    pid,
                    tid: pid,
                    cpu: which as u32,
                    stack: stacks[which],
                    values: vec![1, 1_000_000_000 / 99].into(),
                    timestamp_ns: start_ns + i * 100_000_000,
                    thread_name: comms[which],
                });
            }
            let host = HostInfo {
                hostname: b.intern("replay-host"),
                kernel_release: b.intern("6.1.0-replayed"),
                os_release: b.intern("Debian GNU/Linux 12 (bookworm)"),
                arch: b.intern("x86_64"),
                cpu_count: 2,
            };
            let event = b.intern("cpu-clock");
            b.cpu_sample_types();
            let h = b.header();
            h.start_ns = start_ns;
            h.end_ns = start_ns + 10_000_000_000;
            h.frequency_hz = 99;
            h.period_ns = 1_000_000_000 / 99;
            h.host = host;
            h.event = event;
            b.finish()
        })
        .collect()
}

/// Replays batches starting at `starts` through the router into `DIR/profiles` with the
/// perfdata settings `extra`; returns that folder.
fn replay(dir: &Path, starts: &[u64], extra: &str) -> PathBuf {
    let (binary, symbols) = spin_binary(dir);
    let batches = runtime_batches(&binary, &symbols, starts);
    let recording = write_recording(dir, &batches);
    let out_dir = dir.join("profiles");
    let config = write_config(
        dir,
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n[consumers.perfdata]\npath = \"{}\"\n{extra}\n",
            recording.display(),
            out_dir.display()
        ),
    );
    expect_success(run_with_limit(router().arg("--config").arg(config), LIMIT));
    out_dir
}

fn files_with(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

/// `perf [global...] script -F comm,pid,ip,sym -i FILE`, as text.
fn perf_script(global: &[&str], file: &Path) -> String {
    let out = Command::new("perf")
        .args(global)
        .args(["script", "-F", "comm,pid,ip,sym", "-i"])
        .arg(file)
        .output()
        .expect("perf");
    let text = text(&out);
    assert!(out.status.success(), "perf script: {text}");
    text
}

/// Each event of `perf script` as (comm, pid, symbols of its callchain, leaf first).
fn events(script: &str) -> Vec<(String, u32, Vec<String>)> {
    script
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|event| {
            let mut lines = event.lines().filter(|l| !l.trim().is_empty());
            let mut head = lines.next()?.split_whitespace();
            let (comm, pid) = (head.next()?.to_owned(), head.next()?.parse().ok()?);
            let symbols = lines
                .filter_map(|l| Some(l.trim().split_once(' ')?.1.to_owned()))
                .collect();
            Some((comm, pid, symbols))
        })
        .collect()
}

/// The callchains perf printed, by pid, each once.
fn chains_by_pid(script: &str) -> HashMap<u32, Vec<Vec<String>>> {
    let mut chains: HashMap<u32, Vec<Vec<String>>> = HashMap::new();
    for (_, pid, symbols) in events(script) {
        let seen = chains.entry(pid).or_default();
        if !seen.contains(&symbols) {
            seen.push(symbols);
        }
    }
    chains
}

#[test]
fn perf_script_names_the_python_and_jit_frames_between_the_native_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = replay(dir.path(), &[START_NS], "");
    let data = files_with(&out_dir, ".data");
    let companions = files_with(&out_dir, ".runtime.elf");
    assert_eq!(
        (data.len(), companions.len()),
        (1, 1),
        "{data:?} {companions:?}"
    );
    assert_eq!(
        companions[0].to_string_lossy().strip_suffix(".runtime.elf"),
        data[0].to_string_lossy().strip_suffix(".data"),
        "the companion shares the perf.data's base name"
    );

    let script = perf_script(&[], &data[0]);
    let all = events(&script);
    assert_eq!(all.len(), 100, "{script}");
    let chains = chains_by_pid(&script);
    assert_eq!(
        chains[&PYTHON_PID],
        [PYTHON_CHAIN.map(String::from).to_vec()],
        "{script}"
    );
    assert_eq!(
        chains[&NODE_PID],
        [NODE_CHAIN.map(String::from).to_vec()],
        "{script}"
    );
    assert!(all
        .iter()
        .all(|(comm, pid, _)| (comm == "python3") == (*pid == PYTHON_PID)));

    // perf report weighs them like any function, in the companion file's DSO.
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,sym",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data[0])
        .output()
        .unwrap();
    let report = text(&out);
    let companion_name = companions[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for name in ["inner_spin", "JS:*hotLoop"] {
        let line = report
            .lines()
            .find(|l| l.contains(&format!("[.] {name}")))
            .unwrap_or_else(|| panic!("{name} in {report}"));
        assert!(line.contains("50.00%"), "{line}");
        assert_eq!(
            line.contains(&companion_name),
            name == "JS:*hotLoop",
            "{line}"
        );
    }
}

#[test]
fn copied_without_its_symbol_file_only_the_runtime_frames_are_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = replay(dir.path(), &[START_NS], "");
    let data = files_with(&out_dir, ".data").remove(0);
    let companion = files_with(&out_dir, ".runtime.elf").remove(0);
    let elsewhere = dir.path().join("copied.runtime.elf");
    std::fs::rename(&companion, &elsewhere).unwrap();

    let script = perf_script(&[], &data);
    let chains = chains_by_pid(&script);
    let unknown = |chain: &[&str], unknown: &[usize]| -> Vec<String> {
        chain
            .iter()
            .enumerate()
            .map(|(i, s)| if unknown.contains(&i) { "[unknown]" } else { s }.to_owned())
            .collect()
    };
    assert_eq!(
        chains[&PYTHON_PID],
        [unknown(&PYTHON_CHAIN, &[1, 2, 3])],
        "{script}"
    );
    assert_eq!(chains[&NODE_PID], [unknown(&NODE_CHAIN, &[0])], "{script}");

    // Added to a build-id cache (as on another host), it is found by the build id the
    // perf.data carries, whatever its path.
    let cache = dir.path().join("buildid-cache");
    let cache_arg = cache.to_string_lossy().into_owned();
    let out = Command::new("perf")
        .args(["--buildid-dir", &cache_arg, "buildid-cache", "--add"])
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let script = perf_script(&["--buildid-dir", &cache_arg], &data);
    let chains = chains_by_pid(&script);
    assert_eq!(
        chains[&PYTHON_PID],
        [PYTHON_CHAIN.map(String::from).to_vec()],
        "{script}"
    );
    assert_eq!(
        chains[&NODE_PID],
        [NODE_CHAIN.map(String::from).to_vec()],
        "{script}"
    );
}

#[test]
fn retention_deletes_the_symbol_files_with_their_perf_data() {
    let dir = tempfile::tempdir().unwrap();
    let starts: Vec<u64> = (0..4).map(|i| START_NS + i * 30_000_000_000).collect();
    let out_dir = replay(
        dir.path(),
        &starts,
        "rotate_interval = \"20s\"\nretention_count = 2\nflamegraph = false",
    );
    let data = files_with(&out_dir, ".data");
    let companions = files_with(&out_dir, ".runtime.elf");
    assert_eq!(data.len(), 2, "{data:?}");
    let bases = |files: &[PathBuf], ext: &str| -> Vec<String> {
        files
            .iter()
            .map(|f| f.to_string_lossy().strip_suffix(ext).unwrap().to_owned())
            .collect()
    };
    assert_eq!(bases(&companions, ".runtime.elf"), bases(&data, ".data"));
    // Each perf.data names its own companion.
    for file in &data {
        let chains = chains_by_pid(&perf_script(&[], file));
        assert_eq!(chains[&NODE_PID], [NODE_CHAIN.map(String::from).to_vec()]);
    }
}
