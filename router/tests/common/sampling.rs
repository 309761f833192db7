//! Helpers of the tests that run the eBPF producer on this host: workloads, a profiling run
//! recorded to a file, and the stacks of its samples by function name.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use plugin_api::{FrameKind, ProfileBatch};

use super::*;

pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the eBPF tests need root (CI runs as root); run `sudo -E cargo test`"
    );
}

/// Compiles a workload with frame pointers in every function (at -O1 Debian's gcc leaves
/// them out of leaf functions even with -mno-omit-leaf-frame-pointer) into `dir`.
pub fn compile(dir: &Path, name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/workloads/{name}.c"));
    let binary = dir.join(name);
    let status = Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {name}.c");
    binary
}

pub struct Workload(pub Child);

impl Workload {
    pub fn start(binary: &Path, args: &[&str]) -> Workload {
        Workload(
            Command::new(binary)
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the router with the eBPF producer for `seconds`, then SIGTERM; returns the recorded
/// batches and the log.
pub fn profile(dir: &Path, producer_extra: &str, seconds: f64) -> (Vec<ProfileBatch>, String) {
    let sink = test_consumer_table("sink", &dir.join("sink.jsonl"), "");
    profile_into(dir, producer_extra, &sink, seconds)
}

/// [`profile`] with `consumers` (TOML tables) as the agent's consumers.
pub fn profile_into(
    dir: &Path,
    producer_extra: &str,
    consumers: &str,
    seconds: f64,
) -> (Vec<ProfileBatch>, String) {
    let recording = dir.join("recorded.jsonl");
    let _ = std::fs::remove_file(&recording);
    let config = write_config(
        dir,
        &format!("[producer]\ninterval = \"2s\"\n{producer_extra}\n{consumers}"),
    );
    let recording_arg = recording.display().to_string();
    let child = spawn_router(
        &config,
        &[
            "--record",
            &recording_arg,
            "--log-level",
            "info,router=debug",
        ],
    );
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let log = signal_and_expect_success(child, libc::SIGTERM, Duration::from_secs(30));
    let batches = std::fs::read_to_string(&recording)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (batches, log)
}

/// The function names of every sample whose pid `wanted` accepts (see `stack_names`).
pub fn stacks_of(batches: &[ProfileBatch], wanted: impl Fn(u32) -> bool) -> Vec<Vec<String>> {
    batches
        .iter()
        .flat_map(|batch| {
            batch
                .samples
                .iter()
                .filter(|s| wanted(s.pid))
                .map(move |s| stack_names(batch, s.stack))
        })
        .collect()
}

/// Function names of a sample's stack, leaf first (kernel frames prefixed with `[k]`).
pub fn stack_names(batch: &ProfileBatch, stack: u32) -> Vec<String> {
    batch
        .stack(stack)
        .map(|f| {
            let name = batch.str(f.function);
            match f.kind {
                FrameKind::Kernel => format!("[k]{name}"),
                _ => name.to_owned(),
            }
        })
        .collect()
}

/// Whether `names` holds `chain` in order (not necessarily adjacent), leaf first.
pub fn holds_in_order(names: &[String], chain: &[&str]) -> bool {
    let mut want = chain.iter().peekable();
    for n in names {
        if want.peek().is_some_and(|w| *w == n) {
            want.next();
        }
    }
    want.peek().is_none()
}

/// Every pid that has samples, in order.
pub fn sampled_pids(batches: &[ProfileBatch]) -> Vec<u32> {
    let pids: std::collections::BTreeSet<u32> = batches
        .iter()
        .flat_map(|b| b.samples.iter().map(|s| s.pid))
        .collect();
    pids.into_iter().collect()
}

/// Profiles for `seconds` with `start` run once the router's probe is attached, as a host's
/// processes start under a running agent; returns the batches, the log and what `start` made.
pub fn profile_started<T: Send>(
    dir: &Path,
    producer: &str,
    consumers: &str,
    seconds: f64,
    start: impl FnOnce() -> T + Send,
) -> (Vec<ProfileBatch>, String, T) {
    std::thread::scope(|scope| {
        let started = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            start()
        });
        let (batches, log) = profile_into(dir, producer, consumers, seconds);
        (batches, log, started.join().unwrap())
    })
}

/// The test consumer's table, for runs read back from the recording only.
pub fn sink(dir: &Path) -> String {
    test_consumer_table("sink", &dir.join("sink.jsonl"), "")
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified next
/// to v1 controllers).
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mountinfo
        .lines()
        .find(|line| line.contains(" - cgroup2 "))
        .and_then(|line| line.split(' ').nth(4))
        .expect("a cgroup2 mount");
    PathBuf::from(root)
}

/// `perf script`: the symbol names of each sample of `pid`, leaf first.
pub fn perf_script_stacks(file: &Path, pid: u32) -> Vec<Vec<String>> {
    let out = Command::new("perf")
        .args(["script", "-F", "pid,ip,sym", "-i"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split("\n\n")
        .filter_map(|record| {
            let mut lines = record.lines().filter(|l| !l.trim().is_empty());
            let sample_pid: u32 = lines.next()?.trim().parse().ok()?;
            (sample_pid == pid).then(|| {
                lines
                    .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
                    .filter(|name| !name.starts_with('['))
                    .collect()
            })
        })
        .collect()
}

/// Share of leaf-`chain[0]` stacks (weighted) that hold the whole chain.
pub fn share_with_chain<'a>(
    stacks: impl Iterator<Item = (u64, &'a [String])>,
    chain: &[&str],
) -> (u64, u64) {
    stacks
        .filter(|(_, names)| names.first().is_some_and(|n| n == chain[0]))
        .fold((0, 0), |(whole, all), (weight, names)| {
            let hit = if holds_in_order(names, chain) {
                weight
            } else {
                0
            };
            (whole + hit, all + weight)
        })
}
