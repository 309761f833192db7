//! The eBPF producer on this host (needs root, as CI has): real workloads with known call
//! chains, sampled by the real router, read back from its recording.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use common::{sampling::*, *};

/// eBPF runs one at a time, so that sample counts are not shared between tests.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

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

/// A cgroup v2 group made for one test, removed when dropped (its processes must be gone).
struct TestCgroup(PathBuf);

impl TestCgroup {
    /// A new group at the root of the cgroup v2 hierarchy, wherever it is mounted
    /// (/sys/fs/cgroup, or /sys/fs/cgroup/unified next to v1 controllers).
    fn create() -> TestCgroup {
        let path = cgroup2_root().join(format!("profile-router-test-{}", std::process::id()));
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
