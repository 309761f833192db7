//! The perf.data consumer, read back by `perf script`, `perf report` and headless Chromium.

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use plugin_api::{BatchBuilder, FrameKind, HostInfo, Mapping, Process, ProfileBatch, Sample};

const LIMIT: Duration = Duration::from_secs(120);
const BASE: u64 = 0x5555_5555_4000;
const START_NS: u64 = 1_790_000_000_000_000_000;

fn kallsyms_address(name: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/kallsyms")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let address = u64::from_str_radix(f.next()?, 16).ok()?;
            let _ = f.next()?;
            (f.next()? == name).then_some(address)
        })
}

/// Batches of the spin binary's call chains, mapped as the kernel would map it: 60 % of the
/// samples in inner_spin < outer_work < main, 30 % in outer_work < main, 10 % in main with a
/// kernel part (do_syscall_64) on top.
fn spin_batches(binary: &Path, symbols: &HashMap<String, u64>, count: usize) -> Vec<ProfileBatch> {
    let kernel_text = kallsyms_address("_text").expect("/proc/kallsyms readable (root)");
    let syscall = kallsyms_address("do_syscall_64").expect("do_syscall_64 in kallsyms");
    (0..count)
        .map(|n| {
            let mut b = BatchBuilder::new();
            let start_ns = START_NS + n as u64 * 10_000_000_000;
            let path = b.intern(&binary.display().to_string());
            let kernel_path = b.intern("[kernel.kallsyms]");
            let user = b.mapping(Mapping {
                pid: 4242,
                start: BASE,
                end: BASE + 0x10_0000,
                file_offset: 0,
                path,
                ..Default::default()
            });
            let kernel = b.mapping(Mapping {
                start: kernel_text,
                end: u64::MAX,
                file_offset: kernel_text,
                path: kernel_path,
                kernel: true,
                ..Default::default()
            });
            let frame = |b: &mut BatchBuilder, name: &str| {
                b.frame_symbolized(
                    BASE + symbols[name] + 4,
                    Some(user),
                    name,
                    FrameKind::Native,
                )
            };
            let (inner, outer, main) = (
                frame(&mut b, "inner_spin"),
                frame(&mut b, "outer_work"),
                frame(&mut b, "main"),
            );
            let sys = b.frame_symbolized(
                syscall + 0x10,
                Some(kernel),
                "do_syscall_64",
                FrameKind::Kernel,
            );
            let stacks = [
                b.stack(&[inner, outer, main]),
                b.stack(&[outer, main]),
                b.stack(&[sys, main]),
            ];
            let comm = b.intern("spin");
            b.process(Process {
                pid: 4242,
                comm,
                exe: path,
                container_id: 0,
                ..Default::default()
            });
            for i in 0..100u64 {
                let stack = stacks[match i % 10 {
                    0..=5 => 0,
                    6..=8 => 1,
                    _ => 2,
                }];
                b.sample(Sample {
                    pid: 4242,
                    tid: 4242 + (i % 2) as u32,
                    cpu: (i % 2) as u32,
                    stack,
                    values: vec![1, 1_000_000_000 / 99].into(),
                    timestamp_ns: start_ns + i * 100_000_000,
                    thread_name: comm,
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

fn run_replay(dir: &Path, batches: &[ProfileBatch], perfdata_table: &str, extra: &str) -> String {
    let recording = write_recording(dir, batches);
    let config = write_config(
        dir,
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n[consumers.perfdata]\n{perfdata_table}\n{extra}",
            recording.display()
        ),
    );
    let log = expect_success(run_with_limit(router().arg("--config").arg(config), LIMIT));
    log
}

/// Replays `count` batches of the spin binary into `DIR/profiles` with default settings;
/// returns that folder and the binary's symbols.
fn replay_spin_profile(dir: &Path, count: usize) -> (PathBuf, HashMap<String, u64>) {
    let (binary, symbols) = spin_binary(dir);
    let batches = spin_batches(&binary, &symbols, count);
    let out_dir = dir.join("profiles");
    run_replay(
        dir,
        &batches,
        &format!("path = \"{}\"", out_dir.display()),
        "",
    );
    (out_dir, symbols)
}

fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn perf(args: &[&str], file: &Path) -> String {
    let out = Command::new("perf")
        .args(args)
        .arg("-i")
        .arg(file)
        .output()
        .expect("perf");
    let text = text(&out);
    assert!(out.status.success(), "perf {args:?}: {text}");
    text
}

#[test]
fn perf_script_and_perf_report_read_the_replayed_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (out_dir, symbols) = replay_spin_profile(dir.path(), 2);
    let data = files_with(&out_dir, "data");
    assert_eq!(data.len(), 1, "two 10 s batches fit one 60 s file");

    let script = perf(&["script", "-F", "comm,pid,tid,cpu,time,ip,sym"], &data[0]);
    let events: Vec<&str> = script
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(events.len(), 200, "{script}");
    let first = events[0];
    assert!(first.contains("spin  4242/4242"), "{first}");
    assert!(first.contains("[000]"), "{first}");
    assert!(
        first.contains(&format!("{}.000000", START_NS / 1_000_000_000)),
        "{first}"
    );
    // perf prints user addresses relative to the file: it resolved them through the MMAP2.
    for name in ["inner_spin", "outer_work", "main"] {
        assert!(
            first.contains(&format!("{:x} {name}", symbols[name] + 4)),
            "{name}: {first}"
        );
    }
    assert!(script.contains("spin  4242/4243"), "the second thread");
    assert!(script.contains("do_syscall_64"), "kernel frame resolved");

    let report = perf(
        &[
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "sym",
            "-g",
            "none",
        ],
        &data[0],
    );
    let share = |name: &str| -> f64 {
        report
            .lines()
            .find(|l| l.contains(name) && l.contains('%'))
            .and_then(|l| l.split('%').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in: {report}"))
    };
    assert!((share("inner_spin") - 60.0).abs() < 0.5, "{report}");
    assert!((share("outer_work") - 30.0).abs() < 0.5, "{report}");
    assert!((share("do_syscall_64") - 10.0).abs() < 0.5, "{report}");

    let header = perf(&["report", "--header-only"], &data[0]);
    assert!(header.contains("# hostname : replay-host"), "{header}");
    assert!(header.contains("# os release : 6.1.0-replayed"), "{header}");
    assert!(header.contains("# nrcpus online : 2"), "{header}");
    assert!(header.contains("# nrcpus avail : 2"), "{header}");
}

#[test]
fn the_folded_stacks_and_the_flame_graph_show_the_replayed_functions() {
    let dir = tempfile::tempdir().unwrap();
    let (out_dir, _) = replay_spin_profile(dir.path(), 3);
    let folded = std::fs::read_to_string(&files_with(&out_dir, "folded")[0]).unwrap();
    let counts: HashMap<&str, u64> = folded
        .lines()
        .map(|l| {
            let (stack, n) = l.rsplit_once(' ').unwrap();
            (stack, n.parse().unwrap())
        })
        .collect();
    assert_eq!(counts.values().sum::<u64>(), 300);
    assert_eq!(counts["spin;main;outer_work;inner_spin"], 180);
    assert_eq!(counts["spin;main;outer_work"], 90);
    assert_eq!(counts["spin;main;do_syscall_64_[k]"], 30);

    let svg = &files_with(&out_dir, "svg")[0];
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium (scripts/setup.sh --test installs it)");
    let profile_dir = tempfile::tempdir().unwrap();
    let browser = |extra: &[&str]| {
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.path().display()))
        .args(extra)
        .arg(format!("file://{}", svg.display()))
        .stdin(Stdio::null());
        run_with_limit(&mut cmd, Duration::from_secs(60))
    };
    let dom = browser(&["--dump-dom", "--virtual-time-budget=2000"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for name in ["inner_spin", "outer_work", "do_syscall_64", "spin"] {
        assert!(dom.contains(name), "{name} in the rendered flame graph");
    }
    let png = dir.path().join("flamegraph.png");
    let shot = browser(&[
        &format!("--screenshot={}", png.display()),
        "--window-size=1200,600",
    ]);
    assert!(png.exists(), "screenshot: {}", text(&shot));
    let size = std::fs::metadata(&png).unwrap().len();
    assert!(
        size > 10_000,
        "a flame graph, not a blank page: {size} bytes"
    );
}

#[test]
fn rotation_and_retention_keep_complete_files_within_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (binary, symbols) = spin_binary(dir.path());
    let batches = spin_batches(&binary, &symbols, 12);
    let out_dir = dir.path().join("profiles");
    run_replay(
        dir.path(),
        &batches,
        &format!(
            "path = \"{}\"\nrotate_interval = \"20s\"\nretention_count = 3",
            out_dir.display()
        ),
        "",
    );
    let data = files_with(&out_dir, "data");
    assert_eq!(data.len(), 3, "{data:?}");
    assert_eq!(files_with(&out_dir, "svg").len(), 3);
    assert_eq!(files_with(&out_dir, "folded").len(), 3);
    for file in &data {
        let script = perf(&["script", "-F", "comm,tid"], file);
        assert_eq!(
            script.lines().filter(|l| l.contains("spin")).count(),
            200,
            "{}",
            file.display()
        );
    }
    assert!(std::fs::read_dir(&out_dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    let by_bytes = dir.path().join("by-bytes");
    run_replay(
        dir.path(),
        &batches,
        &format!("path = \"{}\"\nrotate_interval = \"20s\"\nretention_bytes = 100000\nflamegraph = false", by_bytes.display()),
        "",
    );
    let total: u64 = std::fs::read_dir(&by_bytes)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= 100_000, "{total} bytes kept");
    assert!(!files_with(&by_bytes, "data").is_empty());
}

#[test]
fn an_unwritable_path_is_reported_and_the_router_and_other_consumers_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let (binary, symbols) = spin_binary(dir.path());
    let batches = spin_batches(&binary, &symbols, 8);
    let other = dir.path().join("other.jsonl");
    let log = run_replay(
        dir.path(),
        &batches,
        "path = \"/proc/profile-router-cannot-write-here\"\nrotate_interval = \"20s\"",
        &test_consumer_table("other", &other, ""),
    );
    assert!(
        log.contains("perfdata: cannot write /proc/profile-router-cannot-write-here/perf-"),
        "{log}"
    );
    assert!(log.contains("consumer call failed"), "{log}");
    assert_eq!(
        consumed(&other).len(),
        8,
        "the other consumer got every batch"
    );
}

#[test]
fn a_live_ebpf_run_is_read_by_perf_report_from_the_mappings_alone() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (binary, _) = spin_binary(dir.path());
    let mut workload = Command::new(&binary).spawn().unwrap();
    let out_dir = dir.path().join("profiles");
    let child = router()
        .args(["--profiling-interval", "2s", "--profiling-perfdata-path"])
        .arg(&out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = wait_with_limit(child, Duration::from_secs(30));
    let _ = workload.kill();
    let _ = workload.wait();
    assert!(out.status.success(), "{}", text(&out));
    let data = files_with(&out_dir, "data");
    assert_eq!(data.len(), 1);
    assert_eq!(files_with(&out_dir, "folded").len(), 1);
    assert_eq!(files_with(&out_dir, "svg").len(), 1);
    let report = perf(
        &[
            "report",
            "--stdio",
            "--no-children",
            "--comm",
            "spin",
            "--sort",
            "dso,sym",
        ],
        &data[0],
    );
    assert!(report.contains("[.] inner_spin"), "{report}");
    let chain = report
        .split("---inner_spin")
        .nth(1)
        .expect("a call graph under inner_spin");
    let (outer, main) = (chain.find("outer_work"), chain.find("main"));
    assert!(
        matches!((outer, main), (Some(o), Some(m)) if o < m),
        "{report}"
    );
    let binary_name = binary.file_name().unwrap().to_string_lossy();
    assert!(report.contains(&*binary_name), "{report}");
}

#[test]
fn the_readme_run_command_leaves_a_perf_data_a_folded_and_an_svg_behind() {
    use std::io::{BufRead, BufReader};
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .current_dir(dir.path())
        .env("ROUTER_PRODUCER__INTERVAL", "2s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first run builds the release binaries; wait for the agent itself to start.
    let (started_tx, started) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("router started") {
                let _ = started_tx.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let up = started.recv_timeout(Duration::from_secs(1200)).is_ok();
    if up {
        // Something to profile on a quiet machine (idle CPUs are not sampled).
        let mut busy = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        busy.kill().unwrap();
        busy.wait().unwrap();
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(up && status.success(), "{log}");
    let profiles = dir.path().join("profiles");
    for ext in ["data", "folded", "svg"] {
        assert_eq!(files_with(&profiles, ext).len(), 1, "{ext}: {log}");
    }
    let data = &files_with(&profiles, "data")[0];
    let script = perf(&["script", "-F", "comm,pid"], data);
    let shell = script
        .lines()
        .filter(|l| l.trim_start().starts_with("sh "))
        .count();
    assert!(shell > 100, "{script}");
}
