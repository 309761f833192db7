//! Python stacks as users run them: CPython's frames walked by the probe and spliced into
//! the native stack (Debian's python3.11 and the pyenv builds of 3.12 and 3.13 when
//! present), a C extension's native frames above its Python caller, and JIT-compiled code
//! named from perf maps (Node's `--perf-basic-prof`, Python 3.12's `-X perf`). Needs root, as
//! CI has.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{datadog_peer::*, otlp_peer::Receiver, sampling::*, *};
use plugin_api::{FrameKind, ProfileBatch};

/// eBPF runs one at a time, so that sample counts are not shared between tests.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// The interpreters to test: Debian's 3.11 (required) and pyenv's 3.12 and 3.13.
fn pythons() -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/usr/bin/python3.11")];
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    for version in ["3.12", "3.13"] {
        let pattern = Path::new(&home).join(".pyenv/versions");
        let newest = std::fs::read_dir(&pattern)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{version}.")))
            })
            .max();
        if let Some(prefix) = newest {
            found.push(prefix.join(format!("bin/python{version}")));
        }
    }
    assert!(
        found[0].exists(),
        "Debian's python3.11 is installed by the setup"
    );
    found
}

fn chain_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/chain.py")
}

/// A child that runs until dropped, started once it printed its first line.
struct Running(Child);

impl Running {
    fn start(program: &Path, args: &[&str]) -> Running {
        let mut child = Command::new(program)
            .args(args)
            // Node writes its isolate logs into the working directory.
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        Running(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One frame of a sample as the test looks at it.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    file: String,
    line: u32,
    kind: FrameKind,
    runtime: String,
    /// The file mapped where a native frame's code is.
    object: String,
}

/// The user frames (leaf first) of every sample of `pid`.
fn user_stacks(batches: &[ProfileBatch], pid: u32) -> Vec<Vec<Seen>> {
    batches
        .iter()
        .flat_map(|b| {
            b.samples.iter().filter(|s| s.pid == pid).map(move |s| {
                b.stack(s.stack)
                    .filter(|f| f.kind != FrameKind::Kernel)
                    .map(|f| Seen {
                        name: b.str(f.function).to_owned(),
                        file: b.str(f.file).to_owned(),
                        line: f.line,
                        kind: f.kind,
                        runtime: b.str(f.runtime).to_owned(),
                        object: f
                            .mapping
                            .as_ref()
                            .into_option()
                            .map(|&m| b.str(b.mappings[m as usize].path).to_owned())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
        })
        .collect()
}

fn python_names(stack: &[Seen]) -> Vec<&str> {
    stack
        .iter()
        .filter(|f| f.kind == FrameKind::Interpreted)
        .map(|f| f.name.as_str())
        .collect()
}

/// Whether native frames go down to the interpreter's `main` and libc's start. (Debian's
/// python3.11 tail-calls `Py_BytesMain` from `main`, which then leaves no frame.)
fn reaches_main(native: &[Seen]) -> bool {
    native
        .iter()
        .any(|f| f.name == "main" || f.name == "Py_BytesMain")
        && native.last().is_some_and(|f| {
            ["__libc_start_call_main", "__libc_start_main", "_start"].contains(&f.name.as_str())
        })
}

/// Checks the spin workload of `pid`: at least 90 % of the samples whose Python leaf is
/// `leaf` show `leaf <- mid <- outer <- <module>` with chain.py's lines, then native frames
/// down to `main`.
fn assert_python_chain(batches: &[ProfileBatch], pid: u32, python: &Path, log: &str) {
    let stacks = user_stacks(batches, pid);
    let leaf_stacks: Vec<&Vec<Seen>> = stacks
        .iter()
        .filter(|s| python_names(s).first() == Some(&"leaf"))
        .collect();
    assert!(
        leaf_stacks.len() >= 50,
        "{}: {} of {} samples have Python leaf `leaf`; some stacks: {:#?}\n{log}",
        python.display(),
        leaf_stacks.len(),
        stacks.len(),
        stacks.iter().take(3).collect::<Vec<_>>()
    );
    let file = chain_py().display().to_string();
    let right = |stack: &Vec<Seen>| {
        let py: Vec<&Seen> = stack
            .iter()
            .filter(|f| f.kind == FrameKind::Interpreted)
            .collect();
        let last_python = stack
            .iter()
            .rposition(|f| f.kind == FrameKind::Interpreted)
            .unwrap();
        py.len() == 4
            && py.iter().all(|f| f.file == file && f.runtime == "cpython")
            && py[0].name == "leaf"
            && (8..=11).contains(&py[0].line)
            && (py[1].name.as_str(), py[1].line) == ("mid", 15)
            && (py[2].name.as_str(), py[2].line) == ("outer", 20)
            && py[3].name == "<module>"
            && reaches_main(&stack[last_python + 1..])
    };
    let good = leaf_stacks.iter().filter(|s| right(s)).count();
    assert!(
        good * 100 >= leaf_stacks.len() * 90,
        "{}: {good} of {} leaf samples show leaf(8-11) <- mid(15) <- outer(20) <- <module> over native frames to main; a wrong one: {:#?}",
        python.display(),
        leaf_stacks.len(),
        leaf_stacks.iter().find(|s| !right(s))
    );
}

/// Checks the zlib workload: the samples in zlib's code (libz, stripped of its local
/// symbols) show its native frames above the Python caller `compressing`, itself called by
/// `compress_caller`.
fn assert_native_above_python(batches: &[ProfileBatch], pid: u32, python: &Path) {
    let stacks = user_stacks(batches, pid);
    let in_zlib: Vec<&Vec<Seen>> = stacks
        .iter()
        .filter(|s| {
            s.first()
                .is_some_and(|f| f.kind == FrameKind::Native && f.object.contains("/libz.so"))
        })
        .collect();
    assert!(
        in_zlib.len() >= 50,
        "{}: {} of {} samples in zlib; some: {:#?}",
        python.display(),
        in_zlib.len(),
        stacks.len(),
        stacks.iter().take(3).collect::<Vec<_>>()
    );
    let right = |stack: &Vec<Seen>| {
        let first_python = stack.iter().position(|f| f.kind == FrameKind::Interpreted);
        first_python.is_some_and(|i| {
            stack[..i].iter().all(|f| f.kind == FrameKind::Native)
                && stack[..i].iter().any(|f| f.name == "deflate")
                && python_names(stack).starts_with(&["compressing", "compress_caller", "<module>"])
        })
    };
    let good = in_zlib.iter().filter(|s| right(s)).count();
    assert!(
        good * 100 >= in_zlib.len() * 90,
        "{}: {good} of {} zlib samples show zlib's frames above compressing <- compress_caller; a wrong one: {:#?}",
        python.display(),
        in_zlib.len(),
        in_zlib.iter().find(|s| !right(s))
    );
}

#[test]
fn python_functions_sit_in_the_native_stack_with_their_files_and_lines() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    plugin_dir();
    let pythons = pythons();
    let script = chain_py();
    let script = script.to_str().unwrap();
    let (batches, log, workloads) = profile_started(
        dir.path(),
        "frequency_hz = 199",
        &sink(dir.path()),
        8.0,
        || {
            pythons
                .iter()
                .map(|python| {
                    (
                        Running::start(python, &[script, "spin"]),
                        Running::start(python, &[script, "zlib"]),
                    )
                })
                .collect::<Vec<_>>()
        },
    );
    for (python, (spin, zlib)) in pythons.iter().zip(&workloads) {
        assert_python_chain(&batches, spin.pid(), python, &log);
        assert_native_above_python(&batches, zlib.pid(), python);
    }
}

/// Waits until `/tmp/perf-PID.map` names `function`.
fn wait_for_perf_map(pid: u32, function: &str) {
    let path = format!("/tmp/perf-{pid}.map");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&path).is_ok_and(|m| m.contains(function)) {
        assert!(Instant::now() < deadline, "{path} never named {function}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn jit_compiled_javascript_and_perf_trampolined_python_are_named() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    plugin_dir();
    let node_script = "function hotLoop(n) { let s = 0; for (let i = 0; i < n; i++) { s += Math.sqrt(i) % 3; } return s; }\n\
        console.log('ready');\n\
        for (;;) { hotLoop(1e6); }";
    let python312 = pythons()
        .into_iter()
        .find(|p| p.ends_with("python3.12"))
        .expect("pyenv's Python 3.12 (the machine image has it)");
    let script = chain_py();
    let (batches, log, (node, python)) = profile_started(
        dir.path(),
        "frequency_hz = 199",
        &sink(dir.path()),
        8.0,
        || {
            let node = Running::start(Path::new("node"), &["--perf-basic-prof", "-e", node_script]);
            let python = Running::start(
                &python312,
                &["-X", "perf", script.to_str().unwrap(), "spin"],
            );
            wait_for_perf_map(node.pid(), "hotLoop");
            wait_for_perf_map(python.pid(), "py::leaf");
            (node, python)
        },
    );
    let named = |pid: u32, wanted: &str, runtime: &str| -> usize {
        user_stacks(&batches, pid)
            .iter()
            .filter(|s| {
                s.iter().any(|f| {
                    f.kind == FrameKind::Jit && f.name.contains(wanted) && f.runtime == runtime
                })
            })
            .count()
    };
    let samples = |pid: u32| user_stacks(&batches, pid).len();
    for pid in [node.pid(), python.pid()] {
        assert!(
            samples(pid) >= 100,
            "pid {pid}: {} samples\n{log}",
            samples(pid)
        );
    }
    let node_named = named(node.pid(), "hotLoop", "v8");
    assert!(
        node_named * 2 >= samples(node.pid()),
        "{node_named} of {} node samples name hotLoop as V8 JIT code\n{log}",
        samples(node.pid())
    );
    let python_named = named(python.pid(), "py::leaf", "cpython");
    assert!(
        python_named * 2 >= samples(python.pid()),
        "{python_named} of {} python -X perf samples name the trampoline py::leaf",
        samples(python.pid())
    );
    for pid in [node.pid(), python.pid()] {
        let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    }
}

#[test]
fn python_frames_reach_go_pprof_and_the_otlp_receiver() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    plugin_dir();
    let dd_port = free_port();
    let _agent = test_agent(dd_port);
    let receiver = Receiver::start(dir.path(), 0);
    let consumers = format!(
        "[consumers.datadog]\nagent_url = \"http://127.0.0.1:{dd_port}/profiling/v1/input\"\nservice = \"chain\"\n\n[consumers.otlp]\nendpoint = \"http://127.0.0.1:{}\"\n",
        receiver.grpc_port,
    );
    let script = chain_py();
    let (_, log, _spin) =
        profile_started(dir.path(), "frequency_hz = 199", &consumers, 5.0, || {
            Running::start(
                Path::new("/usr/bin/python3.11"),
                &[script.to_str().unwrap(), "spin"],
            )
        });
    let chain = ["leaf", "mid", "outer", "<module>"];

    let pprofs = uploaded_pprofs(dd_port);
    assert!(!pprofs.is_empty(), "no Datadog upload\n{log}");
    let mut traces = Vec::new();
    let mut raw = String::new();
    for pprof in &pprofs {
        traces.append(&mut pprof_traces(dir.path(), pprof).0);
        raw += &go_pprof(dir.path(), pprof, "-raw");
    }
    let python_leaf = |names: &[String]| names.iter().position(|n| n == "leaf");
    // (pprof shortens names like C++ templates: `<module>` shows as `<unknown>`.)
    let (whole, all) = share_with_chain(
        traces
            .iter()
            .filter_map(|(w, s)| Some((*w, &s[python_leaf(s)?..]))),
        &chain[..3],
    );
    assert!(
        all > 0 && whole * 100 >= all * 90,
        "go tool pprof -traces: {whole} of {all} carry {chain:?}: {:?}",
        traces.iter().find(|(_, s)| python_leaf(s).is_some())
    );
    assert!(
        raw.contains(script.to_str().unwrap()),
        "go tool pprof -raw names the Python file:\n{}",
        &raw[..raw.len().min(3000)]
    );

    let otlp = receiver.stacks(|frame_type| frame_type == "cpython");
    let (whole, all) = share_with_chain(otlp.iter().map(|(w, s)| (*w, s.as_slice())), &chain);
    assert!(
        all >= 50 && whole * 100 >= all * 90,
        "OTLP receiver: {whole} of {all} samples with a cpython leaf frame `leaf` carry {chain:?}"
    );
}
