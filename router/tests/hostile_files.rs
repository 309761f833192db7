//! The real router, as root with the eBPF producer, against an unprivileged process (`nobody`,
//! through `setpriv`) that attacks it through the files it reads: a mapped library truncated
//! under the reader, a perf map that is a symlink to a root-only file, a FIFO, or a sparse
//! 50 GB file, a FIFO swapped in for a mapped library. Each run checks that intervals keep
//! coming (none late by more than an interval), that SIGINT exits 0 with the data written, and
//! prints the router's peak RSS. Needs root, as CI has.

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{sampling::*, *};
use plugin_api::ProfileBatch;

/// eBPF runs one at a time.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

const INTERVAL_S: u64 = 1;

/// What a run under attack left.
struct Run {
    batches: Vec<ProfileBatch>,
    log: String,
    /// Every file the perfdata consumer wrote, as text (lossy).
    outputs: String,
    peak_rss_kb: u64,
    attacker_pid: u32,
    attacker_output: String,
    /// `/metrics` just before SIGINT.
    metrics: String,
}

/// Compiles the attacker (tests/workloads/hostile.c) into `dir`.
fn attacker_binary(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/hostile.c");
    let binary = dir.join("hostile");
    let status = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&binary)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling hostile.c");
    binary
}

/// A folder `nobody` may write in.
fn attacker_dir(dir: &Path) -> PathBuf {
    let home = dir.join("nobody");
    fs::create_dir_all(&home).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    home
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs the router (through `wrapper`, e.g. `setpriv` dropping capabilities; empty: none)
/// for `seconds`, with `attack` (the attacker's arguments, run as nobody for `seconds - 4`)
/// started once the probe is attached; SIGINT at the end.
fn run_under_attack(dir: &Path, wrapper: &[&str], attack: &[&str], seconds: u64) -> Run {
    let recording = dir.join("recorded.jsonl");
    let profiles = dir.join("profiles");
    let port = free_port();
    let config = write_config(
        dir,
        &format!(
            "[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[producer]\ninterval = \"{INTERVAL_S}s\"\n[consumers.perfdata]\npath = \"{}\"\n",
            profiles.display()
        ),
    );
    let router_bin = router_bin();
    let mut command = if wrapper.is_empty() {
        router()
    } else {
        let mut command = Command::new(wrapper[0]);
        command.args(&wrapper[1..]).arg(&router_bin);
        command
    };
    let child = command
        .arg("--config")
        .arg(&config)
        .args(["--record", recording.to_str().unwrap()])
        .args(["--log-level", "info,router=debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start router");
    let router_pid = child.id();
    std::thread::sleep(Duration::from_millis(2500));
    let attacker = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(attack)
        .arg((seconds - 4).to_string())
        .current_dir(attacker_dir(dir))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the attacker");
    let attacker_pid = attacker.id();
    let deadline = Instant::now() + Duration::from_secs(seconds - 2);
    let mut peak_rss_kb = 0;
    while Instant::now() < deadline {
        peak_rss_kb = peak_rss_kb.max(rss_kb(router_pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let attacker_output = text(&wait_with_limit(attacker, Duration::from_secs(20)));
    let metrics = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    let log = signal_and_expect_success(child, libc::SIGINT, Duration::from_secs(30));
    let batches = fs::read_to_string(&recording)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut outputs = String::new();
    for entry in fs::read_dir(&profiles).unwrap() {
        let bytes = fs::read(entry.unwrap().path()).unwrap();
        outputs.push_str(&String::from_utf8_lossy(&bytes));
    }
    let batches: Vec<ProfileBatch> = batches;
    let longest_ms = batches
        .iter()
        .map(|b| (b.end_ns - b.start_ns) / 1_000_000)
        .max()
        .unwrap_or(0);
    eprintln!(
        "{attack:?}: peak RSS {:.1} MB, {} batches, the longest interval {longest_ms} ms",
        peak_rss_kb as f64 / 1024.0,
        batches.len()
    );
    Run {
        batches,
        log,
        outputs,
        peak_rss_kb,
        attacker_pid,
        attacker_output,
        metrics,
    }
}

impl Run {
    /// Intervals came every interval for `seconds` (none late by more than an interval), and
    /// the attacker was sampled (the router did look at it).
    fn assert_intervals_kept_coming(&self, seconds: u64) {
        let log = &self.log;
        assert!(
            self.batches.len() as u64 >= seconds - 3,
            "{} batches in {seconds} s:\n{log}",
            self.batches.len()
        );
        for batch in &self.batches {
            let length = Duration::from_nanos(batch.end_ns - batch.start_ns);
            assert!(
                length <= Duration::from_secs(2 * INTERVAL_S) + Duration::from_millis(500),
                "an interval of {length:?}:\n{log}"
            );
        }
        let attacker_sampled = self.batches.iter().any(|batch| {
            batch.processes.iter().any(|p| {
                (p.pid == self.attacker_pid || batch.str(p.comm) == "hostile")
                    && batch.samples.iter().any(|s| s.pid == p.pid)
            })
        });
        assert!(
            attacker_sampled,
            "the attacker was never sampled ({}):\n{log}",
            self.attacker_output
        );
        assert!(!self.outputs.is_empty(), "nothing written");
        assert!(self.peak_rss_kb > 0);
    }
}

/// A copy of a real shared library (libstdc++, 2 MB, with a large `.eh_frame` and symbol
/// table) without its build id, so that each rewrite is a new file to the router, owned by
/// nobody.
fn library_copy(dir: &Path) -> PathBuf {
    let library = [
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/lib/x86_64-linux-gnu/libstdc++.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libstdc++ is installed (gcc needs it)");
    let copy = attacker_dir(dir).join("libvictim.so");
    let status = Command::new("objcopy")
        .args(["--remove-section", ".note.gnu.build-id"])
        .arg(library)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success(), "objcopy");
    std::os::unix::fs::chown(&copy, Some(65534), Some(65534)).unwrap();
    copy
}

#[test]
fn a_mapped_library_truncated_under_the_reader_does_not_stop_the_agent() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let attacker = attacker_binary(dir.path());
    let library = library_copy(dir.path());
    let seconds = 14;
    let run = run_under_attack(
        dir.path(),
        &[],
        &[
            attacker.to_str().unwrap(),
            "truncate",
            library.to_str().unwrap(),
        ],
        seconds,
    );
    run.assert_intervals_kept_coming(seconds);
    let truncations: u64 = run
        .attacker_output
        .split_whitespace()
        .skip_while(|w| *w != "truncations")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the attacker ran: {}", run.attacker_output));
    assert!(truncations >= 100, "{truncations} truncations");
}

#[test]
fn a_perf_map_linked_to_a_root_only_file_leaks_nothing() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let attacker = attacker_binary(dir.path());
    // A root-only file in perf map syntax, naming every address.
    let secret = dir.path().join("secret");
    let secret_text = "root-only-secret-7f3a9c";
    fs::write(&secret, format!("0 7fffffffffff {secret_text}\n")).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let link = format!("link:{}", secret.display());
    let seconds = 10;
    let run = run_under_attack(
        dir.path(),
        &[],
        &[attacker.to_str().unwrap(), "jit", &link],
        seconds,
    );
    run.assert_intervals_kept_coming(seconds);
    let recorded = fs::read_to_string(dir.path().join("recorded.jsonl")).unwrap();
    for (what, text) in [
        ("the perfdata files", &run.outputs),
        ("the log", &run.log),
        ("the recording", &recorded),
    ] {
        assert!(!text.contains(secret_text), "the secret is in {what}");
    }
    let refused: u64 = run
        .metrics
        .lines()
        .find_map(|l| l.strip_prefix("router_perf_map_files_refused_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refusal count in /metrics:\n{}", run.metrics));
    assert!(refused >= 1, "{refused} refused");
}

#[test]
fn a_fifo_or_a_sparse_50_gb_perf_map_does_not_stall_intervals() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    // "none": the same JIT code without a perf map, the agent's usual figure.
    let mut usual_rss_kb = 0;
    for map in ["none", "fifo", "sparse:53687091200"] {
        let dir = tempfile::tempdir().unwrap();
        let attacker = attacker_binary(dir.path());
        let seconds = 10;
        let run = run_under_attack(
            dir.path(),
            &[],
            &[attacker.to_str().unwrap(), "jit", map],
            seconds,
        );
        run.assert_intervals_kept_coming(seconds);
        if map == "none" {
            usual_rss_kb = run.peak_rss_kb;
        }
        assert!(
            run.peak_rss_kb <= usual_rss_kb + 10 * 1024,
            "{map}: peak RSS {} KB, usually {usual_rss_kb} KB",
            run.peak_rss_kb
        );
    }
}

#[test]
fn a_fifo_swapped_in_for_a_mapped_library_stalls_no_table_without_cap_sys_admin() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let attacker = attacker_binary(dir.path());
    let library = library_copy(dir.path());
    // A victim started after the swap, without frame pointers: its chain needs its unwind
    // tables, which the table thread builds only if the FIFO did not stall it.
    let workloads = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads");
    let victim = dir.path().join("chains");
    let status = Command::new("cc")
        .args(["-O2", "-fomit-frame-pointer", "-pthread", "-o"])
        .arg(&victim)
        .arg(workloads.join("chains.c"))
        .status()
        .unwrap();
    assert!(status.success());
    let victim_pid = std::thread::scope(|scope| {
        let started = scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(5));
            let workload = Workload::start(&victim, &["spin"]);
            std::thread::sleep(Duration::from_secs(6));
            workload.pid()
        });
        // Without CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE, /proc/PID/map_files is closed
        // and files are opened by path (the shipped systemd unit's capabilities).
        let run = run_under_attack(
            dir.path(),
            &[
                "setpriv",
                "--bounding-set",
                "-sys_admin,-checkpoint_restore",
                "--",
            ],
            &[
                attacker.to_str().unwrap(),
                "fifo-library",
                library.to_str().unwrap(),
            ],
            14,
        );
        run.assert_intervals_kept_coming(14);
        let pid = started.join().unwrap();
        let stacks = stacks_of(&run.batches, |p| p == pid);
        let spins: Vec<_> = stacks
            .iter()
            .filter(|s| s.first().is_some_and(|n| n == "spin"))
            .collect();
        let whole = spins
            .iter()
            .filter(|s| holds_in_order(s, &["spin", "mid", "outer", "main"]))
            .count();
        assert!(
            spins.len() >= 50 && whole * 10 >= spins.len() * 8,
            "{whole} of {} spin samples with their chain:\n{}",
            spins.len(),
            run.log
        );
        pid
    });
    assert!(victim_pid > 0);
}

/// A FUSE file system served by `tests/peers/hanging_fuse.py` (as root, `allow_other`), which
/// stops answering once `flag` exists; unmounted (its daemon killed, which ends every request
/// it left waiting) on drop.
struct HangingFuse {
    daemon: std::process::Child,
    mountpoint: PathBuf,
}

impl HangingFuse {
    fn mount(source: &Path, mountpoint: &Path, flag: &Path) -> Self {
        fs::create_dir_all(mountpoint).unwrap();
        let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/hanging_fuse.py");
        let daemon = Command::new("python3")
            .arg(peer)
            .args([source, mountpoint, flag])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the FUSE daemon (scripts/setup.sh --test installs fusepy)");
        let fuse = HangingFuse {
            daemon,
            mountpoint: mountpoint.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while fs::read_dir(mountpoint).map_or(0, |d| d.count()) == 0 {
            assert!(
                Instant::now() < deadline,
                "the FUSE file system never came up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        fuse
    }
}

impl Drop for HangingFuse {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

#[test]
fn a_library_on_a_fuse_file_system_that_stops_answering_stalls_nothing() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let attacker = attacker_binary(dir.path());
    let source = dir.path().join("fuse-source");
    fs::create_dir_all(&source).unwrap();
    fs::rename(library_copy(dir.path()), source.join("libvictim.so")).unwrap();
    let mountpoint = dir.path().join("fuse");
    // Dropped before `dir`, whose removal would walk into the mount.
    let fuse = HangingFuse::mount(&source, &mountpoint, &attacker_dir(dir.path()).join("hang"));
    let library = mountpoint.join("libvictim.so");
    let seconds = 12;
    let run = run_under_attack(
        dir.path(),
        &[],
        &[
            attacker.to_str().unwrap(),
            "fuse-library",
            library.to_str().unwrap(),
        ],
        seconds,
    );
    drop(fuse);
    run.assert_intervals_kept_coming(seconds);
    assert!(
        run.log.contains("on a FUSE file system"),
        "the library was not refused:\n{}",
        run.log
    );
}
