//! The eBPF producer on this host (needs root, as CI has): real workloads with known call
//! chains, sampled by the real router, read back from its recording.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use common::*;
use plugin_api::{FrameKind, ProfileBatch};

/// eBPF runs one at a time, so that sample counts are not shared between tests.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the eBPF tests need root (CI runs as root); run `sudo -E cargo test`"
    );
}

/// Compiles a workload with frame pointers in every function (at -O1 Debian's gcc leaves
/// them out of leaf functions even with -mno-omit-leaf-frame-pointer) into `dir`.
fn compile(dir: &Path, name: &str) -> PathBuf {
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

struct Workload(Child);

impl Workload {
    fn start(binary: &Path, args: &[&str]) -> Workload {
        Workload(
            Command::new(binary)
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
    fn pid(&self) -> u32 {
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
fn profile(dir: &Path, producer_extra: &str, seconds: f64) -> (Vec<ProfileBatch>, String) {
    let recording = dir.join("recorded.jsonl");
    let config = write_config(
        dir,
        &format!(
            "[producer]\ninterval = \"2s\"\n{producer_extra}\n{}",
            test_consumer_table("sink", &dir.join("sink.jsonl"), "")
        ),
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
fn stacks_of(batches: &[ProfileBatch], wanted: impl Fn(u32) -> bool) -> Vec<Vec<String>> {
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
fn stack_names(batch: &ProfileBatch, stack: u32) -> Vec<String> {
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
fn holds_in_order(names: &[String], chain: &[&str]) -> bool {
    let mut want = chain.iter().peekable();
    for n in names {
        if want.peek().is_some_and(|w| *w == n) {
            want.next();
        }
    }
    want.peek().is_none()
}

#[test]
fn cpu_bound_workload_shows_its_call_chain_and_the_sample_count_adds_up() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let spin = compile(dir.path(), "spin");
    let syscalls = compile(dir.path(), "syscalls");
    // Plugins built now, not while the timers of the short-lived processes below run.
    plugin_dir();
    let a = Workload::start(&spin, &[]);
    let b = Workload::start(&spin, &[]);
    let sys = Workload::start(&syscalls, &[]);
    // Starts after the router, burns 0.6 s and exits mid-interval.
    let short_lived = {
        let spin = spin.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2500));
            let mut child = Command::new(&spin).arg("0.6").spawn().unwrap();
            let pid = child.id();
            child.wait().unwrap();
            pid
        })
    };
    // Ten processes of 0.05 s each, shorter than the reader's periodic drain: their first
    // sample must wake the reader at once, or their mappings are gone before it reads them.
    let blinks = {
        let spin = spin.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(3500));
            (0..10)
                .map(|_| {
                    let mut child = Command::new(&spin).arg("0.05").spawn().unwrap();
                    let pid = child.id();
                    child.wait().unwrap();
                    pid
                })
                .collect::<Vec<u32>>()
        })
    };
    let (batches, log) = profile(dir.path(), "", 7.3);
    let short_pid = short_lived.join().unwrap();
    let blink_pids = blinks.join().unwrap();
    assert!(batches.len() >= 3, "{log}");

    // The call chain of the CPU-bound workload.
    for pid in [a.pid(), b.pid()] {
        let samples: Vec<_> = batches
            .iter()
            .flat_map(|batch| {
                batch
                    .samples
                    .iter()
                    .filter(|s| s.pid == pid)
                    .map(move |s| (batch, s))
            })
            .collect();
        assert!(samples.len() > 100, "pid {pid}: {} samples", samples.len());
        let with_chain = samples
            .iter()
            .filter(|(batch, s)| {
                holds_in_order(
                    &stack_names(batch, s.stack),
                    &["inner_spin", "outer_work", "main"],
                )
            })
            .count();
        assert!(
            with_chain * 10 >= samples.len() * 8,
            "pid {pid}: only {with_chain} of {} samples hold inner_spin < outer_work < main",
            samples.len()
        );
        let batch = batches.iter().find(|b| b.process(pid).is_some()).unwrap();
        let process = batch.process(pid).unwrap();
        assert_eq!(batch.str(process.comm), "spin");
        assert!(batch.str(process.exe).ends_with("/spin"));
    }

    // Syscalls: a symbolized kernel part on top of the user part.
    let sys_stacks = stacks_of(&batches, |pid| pid == sys.pid());
    let kernel_over_user = sys_stacks
        .iter()
        .filter(|names| {
            let entry = names.iter().position(|n| {
                n.starts_with("[k]")
                    && (n.contains("do_syscall_64")
                        || n.contains("sys_")
                        || n.contains("entry_SYSCALL"))
            });
            let user = names.iter().position(|n| n == "syscall_loop");
            matches!((entry, user), (Some(k), Some(u)) if k < u)
        })
        .count();
    assert!(
        kernel_over_user > 0,
        "no syscall stack with a symbolized kernel part under syscall_loop: {:?}",
        &sys_stacks[..sys_stacks.len().min(5)]
    );

    // The short-lived process appears, with its frames symbolized.
    let short = stacks_of(&batches, |pid| pid == short_pid);
    assert!(
        short.len() >= 10,
        "short-lived pid {short_pid}: {} samples",
        short.len()
    );
    assert!(short
        .iter()
        .any(|names| holds_in_order(names, &["inner_spin", "outer_work", "main"])));

    let blink_stacks = stacks_of(&batches, |pid| blink_pids.contains(&pid));
    let blink_symbolized = blink_stacks
        .iter()
        .filter(|names| holds_in_order(names, &["inner_spin", "outer_work", "main"]))
        .count();
    assert!(
        blink_stacks.len() >= 5 && blink_symbolized * 10 >= blink_stacks.len() * 8,
        "0.05 s processes: {blink_symbolized} of {} samples symbolized",
        blink_stacks.len()
    );

    // No idle samples by default.
    assert!(batches.iter().all(|b| b.samples.iter().all(|s| s.pid != 0)));

    // Full intervals of a busy machine: frequency x CPUs x seconds, within 15 %, nothing lost.
    for batch in &batches[1..batches.len() - 1] {
        let seconds = (batch.end_ns - batch.start_ns) as f64 / 1e9;
        let expected = 99.0 * f64::from(batch.host.cpu_count) * seconds;
        let got = batch.samples.len() as f64;
        assert!(
            (got - expected).abs() <= expected * 0.15,
            "{got} samples in {seconds:.2}s, expected about {expected:.0}"
        );
        assert_eq!(batch.lost.ring_buffer_full, 0);
        assert_eq!(batch.str(batch.event), "cpu-clock");
        assert_eq!(batch.frequency_hz, 99);
    }
    assert!(
        log.contains("interval collected"),
        "the per-interval debug line: {log}"
    );
}

#[test]
fn the_pids_filter_returns_only_that_process_and_max_stack_depth_cuts_its_stacks() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let spin = compile(dir.path(), "spin");
    let wanted = Workload::start(&spin, &[]);
    let _other = Workload::start(&spin, &[]);
    let producer = format!("pids = [{}]\nmax_stack_depth = 2", wanted.pid());
    let (batches, log) = profile(dir.path(), &producer, 3.0);
    assert_eq!(sampled_pids(&batches), [wanted.pid()], "{log}");
    // The leaf-most two frames of each side, e.g. inner_spin and outer_work, no main.
    let stacks = stacks_of(&batches, |_| true);
    assert!(stacks.iter().all(|names| {
        let kernel = names.iter().filter(|n| n.starts_with("[k]")).count();
        kernel <= 2 && names.len() - kernel <= 2
    }));
    assert!(
        stacks
            .iter()
            .any(|names| names == &["inner_spin".to_string(), "outer_work".to_string()]),
        "{:?}",
        &stacks[..stacks.len().min(5)]
    );
}

/// Every pid that has samples, in order.
fn sampled_pids(batches: &[ProfileBatch]) -> Vec<u32> {
    let pids: std::collections::BTreeSet<u32> = batches
        .iter()
        .flat_map(|b| b.samples.iter().map(|s| s.pid))
        .collect();
    pids.into_iter().collect()
}

/// A cgroup v2 group made for one test, removed when dropped (its processes must be gone).
struct TestCgroup(PathBuf);

impl TestCgroup {
    /// A new group at the root of the cgroup v2 hierarchy, wherever it is mounted
    /// (/sys/fs/cgroup, or /sys/fs/cgroup/unified next to v1 controllers).
    fn create() -> TestCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = mountinfo
            .lines()
            .find(|line| line.contains(" - cgroup2 "))
            .and_then(|line| line.split(' ').nth(4))
            .expect("a cgroup2 mount");
        let path = Path::new(root).join(format!("profile-router-test-{}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        TestCgroup(path)
    }
    /// The group's path as /proc/PID/cgroup shows it.
    fn name(&self) -> String {
        format!("/{}", self.0.file_name().unwrap().to_str().unwrap())
    }
    /// Runs `binary` inside the group (it joins before exec).
    fn start(&self, binary: &Path) -> Workload {
        let join = format!(
            "echo $$ > {}/cgroup.procs && exec {}",
            self.0.display(),
            binary.display()
        );
        Workload::start(Path::new("/bin/sh"), &["-c", &join])
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn the_comms_and_cgroups_filters_keep_only_matching_processes() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let spin = compile(dir.path(), "spin");
    let twirl = dir.path().join("twirl");
    std::fs::copy(&spin, &twirl).unwrap();
    let group = TestCgroup::create();
    {
        let wanted = group.start(&twirl);
        let _other_comm = group.start(&spin);
        let _other_cgroup = Workload::start(&twirl, &[]);
        // Every workload has joined its group before the router sees it.
        std::thread::sleep(Duration::from_millis(200));
        let filters = format!("comms = [\"twirl\"]\ncgroups = [\"{}\"]", group.name());
        let (batches, log) = profile(dir.path(), &filters, 3.0);
        assert_eq!(sampled_pids(&batches), [wanted.pid()], "{log}");
    }
}

#[test]
fn check_without_privileges_names_the_missing_capabilities() {
    require_root();
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("setpriv (util-linux)");
    let out = run_with_limit(
        Command::new(setpriv)
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(router_bin())
            .arg("--check")
            .args(["--profiling-perfdata-path", "/tmp"]),
        Duration::from_secs(30),
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("error: producer: the eBPF producer cannot start"),
        "{log}"
    );
    assert!(log.contains("CAP_BPF and CAP_PERFMON"), "{log}");
    assert!(log.contains("kernel.perf_event_paranoid"), "{log}");
}
