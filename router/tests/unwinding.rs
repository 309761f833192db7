//! The CFI (`.eh_frame`) unwinder on binaries built the way users build them, without frame
//! pointers (`gcc -O2 -fomit-frame-pointer`, `rustc -O`), calling through Debian's libc.
//! Every chain is also checked with `unwinder = "frame-pointer"`, where it must break: the
//! assertions can fail. Needs root, as CI has.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use common::{datadog_peer::*, otlp_peer::Receiver, sampling::*, *};
use plugin_api::{FrameKind, ProfileBatch};

/// eBPF runs one at a time, so that sample counts are not shared between tests.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// A workload and the call chain its leaf's samples must carry, leaf first.
struct Chain {
    label: &'static str,
    args: &'static [&'static str],
    chain: &'static [&'static str],
    /// Names one of which must be the stack's outermost frame (a thread's start).
    outermost: &'static [&'static str],
}

const SPIN: Chain = Chain {
    label: "C chain",
    args: &["spin"],
    chain: &["spin", "mid", "outer", "main"],
    outermost: &[],
};
const QSORT: Chain = Chain {
    label: "qsort comparator through libc",
    args: &["qsort"],
    chain: &["compare_keys", "sort_batch", "main"],
    outermost: &[],
};
const THREAD: Chain = Chain {
    label: "pthread worker",
    args: &["thread"],
    chain: &["thread_spin", "worker", "start_thread"],
    outermost: &["clone3", "__clone3", "clone", "__clone"],
};
const RUST: Chain = Chain {
    label: "Rust release chain",
    args: &[],
    chain: &[
        "chains::leaf_spin",
        "chains::middle",
        "chains::outer",
        "chains::main",
        "main",
    ],
    outermost: &[],
};

/// The C and Rust workloads, compiled as users compile them: no frame pointers.
struct Binaries {
    c: PathBuf,
    rust: PathBuf,
}

fn build_workloads(dir: &Path) -> Binaries {
    let workloads = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads");
    let compile = |compiler: &str, flags: &[&str], source: &str, binary: PathBuf| {
        let status = Command::new(compiler)
            .args(flags)
            .arg("-o")
            .arg(&binary)
            .arg(workloads.join(source))
            .status()
            .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
        assert!(status.success(), "compiling {source}");
        binary
    };
    Binaries {
        c: compile(
            "cc",
            &["-O2", "-fomit-frame-pointer", "-pthread"],
            "chains.c",
            dir.join("chains"),
        ),
        rust: compile(
            "rustc",
            &["-O", "--edition", "2021"],
            "chains.rs",
            dir.join("chains-rs"),
        ),
    }
}

/// The user part of a stack (kernel frames dropped), leaf first.
fn user_names(batch: &ProfileBatch, stack: u32) -> Vec<String> {
    stack_names(batch, stack)
        .into_iter()
        .filter(|n| !n.starts_with("[k]"))
        .collect()
}

/// Of `pid`'s samples whose leaf is the chain's leaf: how many carry the whole chain in
/// order (and end at one of its outermost frames), and how many there are.
fn whole_chain_share(batches: &[ProfileBatch], pid: u32, chain: &Chain) -> (usize, usize) {
    let leaf_stacks: Vec<Vec<String>> = batches
        .iter()
        .flat_map(|b| {
            b.samples
                .iter()
                .filter(|s| s.pid == pid)
                .map(move |s| user_names(b, s.stack))
        })
        .filter(|names| names.first().is_some_and(|n| n == chain.chain[0]))
        .collect();
    let whole = leaf_stacks
        .iter()
        .filter(|names| {
            holds_in_order(names, chain.chain)
                && (chain.outermost.is_empty()
                    || names
                        .last()
                        .is_some_and(|n| chain.outermost.contains(&n.as_str())))
        })
        .count();
    (whole, leaf_stacks.len())
}

/// Every user frame of `pid`'s samples lies in one of its executable mappings (files, the
/// vDSO, anonymous code), as /proc/PID/maps lists them while it runs.
fn assert_no_garbage(batches: &[ProfileBatch], pid: u32) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("the workload runs");
    let executable: Vec<(u64, u64)> = maps
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.contains('x'))
        })
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect();
    for batch in batches {
        for sample in batch.samples.iter().filter(|s| s.pid == pid) {
            for frame in batch.stack(sample.stack) {
                if frame.kind == FrameKind::Kernel {
                    continue;
                }
                assert!(
                    executable
                        .iter()
                        .any(|&(start, end)| (start..end).contains(&frame.address)),
                    "pid {pid}: user frame {:#x} outside every executable mapping: {:?}",
                    frame.address,
                    stack_names(batch, sample.stack)
                );
            }
        }
    }
}

fn percent(whole: usize, all: usize) -> f64 {
    whole as f64 * 100.0 / all.max(1) as f64
}

#[test]
fn without_frame_pointers_dwarf_unwinding_keeps_whole_chains_and_frame_pointers_lose_them() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let binaries = build_workloads(dir.path());
    plugin_dir();
    let chains = [&SPIN, &QSORT, &THREAD, &RUST];
    let start_all = || -> Vec<Workload> {
        chains
            .iter()
            .map(|chain| {
                let binary = if chain.args.is_empty() {
                    &binaries.rust
                } else {
                    &binaries.c
                };
                Workload::start(binary, chain.args)
            })
            .collect()
    };

    let port = free_port();
    let with_telemetry = format!(
        "{}\n[telemetry]\nlisten = \"127.0.0.1:{port}\"\n",
        sink(dir.path())
    );
    let (dwarf, log, (workloads, metrics)) = profile_started(
        dir.path(),
        "frequency_hz = 199",
        &with_telemetry,
        6.0,
        || {
            let workloads = start_all();
            std::thread::sleep(Duration::from_secs(3));
            let metrics = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
                .and_then(|r| r.text())
                .unwrap_or_default();
            (workloads, metrics)
        },
    );
    for (chain, workload) in chains.iter().zip(&workloads) {
        let (whole, all) = whole_chain_share(&dwarf, workload.pid(), chain);
        assert!(all >= 100, "{}: {all} leaf samples\n{log}", chain.label);
        assert!(
            whole * 100 >= all * 95,
            "dwarf, {}: {whole} of {all} leaf samples ({:.1} %) carry {:?}",
            chain.label,
            percent(whole, all),
            chain.chain
        );
        assert_no_garbage(&dwarf, workload.pid());
    }
    let outcomes = dwarf.iter().fold(
        Default::default(),
        |mut sum: plugin_api::UnwindOutcomes, b| {
            sum.add(&b.lost.unwind);
            sum
        },
    );
    assert!(outcomes.end_of_stack > 0, "{outcomes:?}");
    assert_eq!(outcomes.frame_pointers, 0, "{outcomes:?}");
    assert!(
        log.contains("unwind_end_of_stack="),
        "the per-interval debug line: {log}"
    );
    // The tables of libc, the loader and both workloads at least, and the unwinder's maps.
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert!(gauge("router_unwind_tables_loaded") >= 4.0, "{metrics}");
    assert!(gauge("router_unwind_table_rows") > 20_000.0, "{metrics}");
    assert!(
        gauge("router_unwind_map_bytes") >= 32.0 * 1024.0 * 1024.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("router_user_stacks_total{outcome=\"end_of_stack\"}"),
        "{metrics}"
    );

    drop(workloads);
    let (frame_pointers, _, workloads) = profile_started(
        dir.path(),
        "frequency_hz = 199\nunwinder = \"frame-pointer\"",
        &sink(dir.path()),
        4.0,
        start_all,
    );
    for (chain, workload) in chains.iter().zip(&workloads) {
        let (whole, all) = whole_chain_share(&frame_pointers, workload.pid(), chain);
        assert!(
            all >= 50,
            "frame pointers, {}: {all} leaf samples",
            chain.label
        );
        assert!(
            whole * 100 < all * 95,
            "frame pointers, {}: {whole} of {all} leaf samples carry {:?}: the test cannot fail",
            chain.label,
            chain.chain
        );
        assert_no_garbage(&frame_pointers, workload.pid());
    }
}

#[test]
fn a_deleted_binary_and_one_in_a_private_mount_namespace_are_unwound_and_symbolized() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let binaries = build_workloads(dir.path());
    plugin_dir();

    let doomed = dir.path().join("deleted-after-start");
    std::fs::copy(&binaries.c, &doomed).unwrap();
    // A tmpfs mounted in the workload's own mount namespace: the binary exists nowhere else.
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let script = format!(
        "mount -t tmpfs none {p} && cp {bin} {p}/namespaced && exec {p}/namespaced spin",
        p = private.display(),
        bin = binaries.c.display()
    );
    let start_both = || {
        let deleted = Workload::start(&doomed, &["spin"]);
        let namespaced = Workload::start(
            Path::new("unshare"),
            &["--mount", "--propagation", "private", "sh", "-c", &script],
        );
        std::thread::sleep(Duration::from_millis(100));
        std::fs::remove_file(&doomed).unwrap();
        (deleted, namespaced)
    };
    let (batches, log, (deleted, namespaced)) = profile_started(
        dir.path(),
        "frequency_hz = 199",
        &sink(dir.path()),
        5.0,
        start_both,
    );
    assert!(
        std::fs::read_dir(&private).unwrap().next().is_none(),
        "the private tmpfs is visible outside its namespace"
    );
    for (label, pid) in [
        ("deleted binary", deleted.pid()),
        ("private mount namespace", namespaced.pid()),
    ] {
        let (whole, all) = whole_chain_share(&batches, pid, &SPIN);
        let stacks = stacks_of(&batches, |p| p == pid);
        assert!(
            all >= 100,
            "{label}: {all} leaf samples of {}: {:?}\n{log}",
            stacks.len(),
            &stacks[..stacks.len().min(3)]
        );
        assert!(
            whole * 100 >= all * 95,
            "{label}: {whole} of {all} leaf samples carry {:?}",
            SPIN.chain
        );
        assert_no_garbage(&batches, pid);
    }
}

/// `go tool pprof -traces`: each trace's weight and its function names, leaf first, and the
/// tool's whole output.
#[test]
fn unwound_chains_reach_perf_script_go_pprof_and_the_otlp_receiver() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let binaries = build_workloads(dir.path());
    plugin_dir();
    let dd_port = free_port();
    let _agent = test_agent(dd_port);
    let receiver = Receiver::start(dir.path(), 0);
    let profiles = dir.path().join("profiles");
    let consumers = format!(
        "[consumers.datadog]\nagent_url = \"http://127.0.0.1:{dd_port}/profiling/v1/input\"\nservice = \"chains\"\n\n[consumers.otlp]\nendpoint = \"http://127.0.0.1:{}\"\n\n[consumers.perfdata]\npath = \"{}\"\n",
        receiver.grpc_port,
        profiles.display()
    );
    let (_, log, spin) = profile_started(dir.path(), "frequency_hz = 199", &consumers, 5.0, || {
        Workload::start(&binaries.c, &["spin"])
    });
    let chain = SPIN.chain;

    let data = std::fs::read_dir(&profiles)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .unwrap_or_else(|| panic!("no perf.data written\n{log}"));
    let perf = perf_script_stacks(&data, spin.pid());
    let (whole, all) = share_with_chain(perf.iter().map(|s| (1, s.as_slice())), chain);
    assert!(
        all >= 100 && whole * 100 >= all * 95,
        "perf script: {whole} of {all} leaf samples carry {chain:?}: {:?}",
        &perf[..perf.len().min(3)]
    );

    let pprofs = uploaded_pprofs(dd_port);
    assert!(!pprofs.is_empty(), "no Datadog upload\n{log}");
    let mut traces = Vec::new();
    let mut raw = String::new();
    for pprof in &pprofs {
        let (mut these, output) = pprof_traces(dir.path(), pprof);
        traces.append(&mut these);
        raw += &output;
    }
    let (whole, all) = share_with_chain(traces.iter().map(|(w, s)| (*w, s.as_slice())), chain);
    assert!(
        all > 0 && whole * 100 >= all * 95,
        "go tool pprof -traces: {whole} of {all} carry {chain:?}:\n{}",
        &raw[..raw.len().min(3000)]
    );

    let otlp = receiver.stacks(|frame_type| frame_type != "kernel");
    let (whole, all) = share_with_chain(otlp.iter().map(|(w, s)| (*w, s.as_slice())), chain);
    assert!(
        all >= 100 && whole * 100 >= all * 95,
        "OTLP receiver: {whole} of {all} leaf stacks carry {chain:?}"
    );
}
