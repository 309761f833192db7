//! What processes and the configuration path hand the router is data, never syntax, and never
//! unbounded: an unprivileged process's hostile `DD_SERVICE` (line breaks, commas, `env:prod`,
//! 5 MB of it) stays one capped tag value in Datadog's test agent and the OTLP receiver and
//! costs the router no memory; a configuration path turned into `/dev/zero` or a FIFO at
//! SIGHUP is refused while delivery goes on; a fake `python3.12` whose runtime state is
//! garbage keeps its native `_PyEval_EvalFrameDefault` frame. The eBPF tests need root, as CI
//! has.

mod common;

use std::{
    collections::BTreeSet,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{datadog_peer::*, otlp_peer::Receiver, sampling::*, *};

/// Processes sampled in each run of the environment test.
const WORKLOADS: usize = 10;
/// The short hostile service: a line break, commas, and tags of its own.
const HOSTILE_SERVICE: &str = "svc\ninjected,env:prod,version:666";
/// What [`HOSTILE_SERVICE`] arrives as.
const HOSTILE_SERVICE_SANITIZED: &str = "svc_injected_env:prod_version:666";
/// The start of the 5 MB one.
const BIG_SERVICE_START: &str = "big\nsvc,env:prod,version:666";
/// Environment variables of 128 KiB (execve's limit for one) after the big service: 5 MiB.
const PADDING_VARIABLES: usize = 40;
/// Datadog's limit for a tag, which a value is capped at.
const MAX_TAG_VALUE_CHARS: usize = 200;

/// The util-linux `setpriv` that runs a workload as `nobody`.
/// The eBPF tests run one at a time: each counts samples that another's load would take.
static EXCLUSIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setpriv() -> &'static str {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("setpriv (util-linux)")
}

/// Compiles tests/workloads/hostile_environ.c into `dir`, where `nobody` may run it.
fn hostile_environ_binary(dir: &Path) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    compile(dir, "hostile_environ")
}

/// How a workload of the environment test is started.
enum Environment {
    /// `DD_SERVICE=plain`.
    Plain,
    /// `DD_SERVICE` = [`HOSTILE_SERVICE`].
    Hostile,
    /// `DD_SERVICE` = [`BIG_SERVICE_START`] followed, in /proc/PID/environ, by 5 MiB.
    HostileAndBig,
}

/// Starts `binary` as `nobody` with only `DD_SERVICE` (and padding) in its environment.
fn start_unprivileged(binary: &Path, environment: &Environment) -> Workload {
    let mut command = Command::new(setpriv());
    command
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(binary)
        .env_clear()
        .stdout(Stdio::null());
    match environment {
        Environment::Plain => {
            command.env("DD_SERVICE", "plain");
        }
        Environment::Hostile => {
            command.env("DD_SERVICE", HOSTILE_SERVICE);
        }
        Environment::HostileAndBig => {
            // Sorted before the PAD_ variables, as Command passes its environment.
            command.env("DD_SERVICE", BIG_SERVICE_START).arg("join");
            for i in 0..PADDING_VARIABLES {
                let key = format!("PAD_{i:02}");
                let value = "p".repeat(128 * 1024 - key.len() - 2);
                command.env(key, value);
            }
            // SAFETY: only setrlimit(2) between fork and exec. A 64 MiB stack limit lets
            // execve take 16 MiB of arguments and environment.
            unsafe {
                command.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 64 << 20,
                        rlim_max: 64 << 20,
                    };
                    if libc::setrlimit(libc::RLIMIT_STACK, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
    }
    Workload(command.spawn().expect("start the workload through setpriv"))
}

/// The router's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// The router's resident memory now (VmRSS), in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one run of the environment test saw.
struct Run {
    /// `tags_profiler` of every upload the Datadog test agent stored.
    tags: Vec<String>,
    /// `service.name` of every OTLP resource the receiver got.
    otlp_services: BTreeSet<String>,
    /// The router's /metrics at the end.
    metrics: String,
    /// The router's peak RSS, KiB.
    peak_rss_kib: u64,
    log: String,
}

/// Profiles `WORKLOADS` processes started with `environments` for 8 s into Datadog's test
/// agent and the OTLP receiver.
fn run_with(dir: &Path, binary: &Path, environments: &[Environment]) -> Run {
    let workloads: Vec<Workload> = environments
        .iter()
        .map(|e| start_unprivileged(binary, e))
        .collect();
    let dd_port = free_port();
    let _agent = test_agent(dd_port);
    let receiver = Receiver::start(dir, 0);
    let telemetry = free_port();
    let config = write_config(
        dir,
        &format!(
            "[telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\n\
             [producer]\ninterval = \"2s\"\nfrequency_hz = 49\ncomms = [\"hostile_environ\"]\n\
             [consumers.datadog]\nagent_url = \"http://127.0.0.1:{dd_port}/profiling/v1/input\"\nupload_interval = \"2s\"\n\
             [consumers.otlp]\nendpoint = \"http://127.0.0.1:{}\"\ngroup_by = \"service\"\n",
            receiver.grpc_port
        ),
    );
    let child = spawn_router(&config, &[]);
    assert!(wait_for_port(telemetry, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_secs(8));
    let metrics = reqwest::blocking::get(format!("http://127.0.0.1:{telemetry}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let peak_rss_kib = peak_rss_kib(child.id());
    let log = signal_and_expect_success(child, libc::SIGTERM, Duration::from_secs(30));
    drop(workloads);
    let tags = stored_uploads(dd_port)
        .iter()
        .map(|u| u.event()["tags_profiler"].as_str().unwrap().to_owned())
        .collect();
    let otlp_services = receiver
        .requests()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap().clone())
        .map(|r| {
            r["resource"]["service.name"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    Run {
        tags,
        otlp_services,
        metrics,
        peak_rss_kib,
        log,
    }
}

/// The value of the `router_process_values_sanitized_total` line for `field`.
fn sanitized_total(metrics: &str, field: &str) -> u64 {
    let prefix = format!("router_process_values_sanitized_total{{field=\"{field}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in\n{metrics}"))
}

#[test]
fn a_hostile_dd_service_is_one_capped_tag_value_and_costs_the_router_no_memory() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let binary = hostile_environ_binary(dir.path());
    plugin_dir();

    let plain: Vec<Environment> = (0..WORKLOADS).map(|_| Environment::Plain).collect();
    let baseline = run_with(dir.path(), &binary, &plain);
    assert!(!baseline.tags.is_empty(), "no upload\n{}", baseline.log);
    assert!(
        baseline
            .tags
            .iter()
            .all(|t| t.starts_with("service:plain,")),
        "{:?}",
        baseline.tags
    );

    let hostile: Vec<Environment> = std::iter::once(Environment::Hostile)
        .chain((1..WORKLOADS).map(|_| Environment::HostileAndBig))
        .collect();
    let run = run_with(dir.path(), &binary, &hostile);
    eprintln!(
        "router peak RSS: {} KiB with {WORKLOADS} plain processes, {} KiB with the hostile ones",
        baseline.peak_rss_kib, run.peak_rss_kib
    );
    assert!(
        run.tags.len() >= 2,
        "{} uploads\n{}",
        run.tags.len(),
        run.log
    );
    let mut services = BTreeSet::new();
    for tags in &run.tags {
        assert!(!tags.contains(['\n', '\r']), "{tags:?}");
        let pairs: Vec<(&str, &str)> = tags
            .split(',')
            .map(|t| t.split_once(':').unwrap_or((t, "")))
            .collect();
        // Neither the workloads nor the consumer set an env or a version: any is injected.
        assert!(
            !pairs.iter().any(|(k, _)| *k == "env" || *k == "version"),
            "an injected tag in {tags:?}"
        );
        let service: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| *k == "service")
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(service.len(), 1, "{tags:?}");
        assert!(
            service[0].chars().count() <= MAX_TAG_VALUE_CHARS,
            "{tags:?}"
        );
        services.insert(service[0].to_owned());
    }
    let big_start = "big_svc_env:prod_version:666xPAD_00=ppp";
    let expected = |services: &BTreeSet<String>| {
        services.len() == 2
            && services.contains(HOSTILE_SERVICE_SANITIZED)
            && services
                .iter()
                .any(|s| s.starts_with(big_start) && s.chars().count() == MAX_TAG_VALUE_CHARS)
    };
    assert!(expected(&services), "Datadog services: {services:?}");
    assert!(
        expected(&run.otlp_services),
        "OTLP service.name: {:?}",
        run.otlp_services
    );
    assert!(
        sanitized_total(&run.metrics, "service") >= WORKLOADS as u64,
        "{}",
        run.metrics
    );
    assert_eq!(sanitized_total(&baseline.metrics, "service"), 0);
    assert!(
        run.peak_rss_kib <= baseline.peak_rss_kib + 10 * 1024,
        "peak RSS {} KiB with the hostile environments, {} KiB without",
        run.peak_rss_kib,
        baseline.peak_rss_kib
    );
}

/// The router's memory may not pass this while it reloads from a hostile path.
const RELOAD_RSS_LIMIT_KIB: u64 = 300 * 1024;

/// Runs the router on a replayed recording, turns its configuration path into something
/// else with `replace`, sends SIGHUP and expects the reload refused with `reason` while the
/// consumer keeps receiving, then a prompt exit 0 on SIGTERM.
fn a_reload_from_a_path_turned_into(replace: impl FnOnce(&Path), reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(3));
    let out = dir.path().join("out.jsonl");
    let config = write_config(
        dir.path(),
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 50\nreplay.repeat = 1000\n{}",
            recording.display(),
            test_consumer_table("c", &out, "")
        ),
    );
    let child = spawn_router(&config, &[]);
    wait_for_consumed(&out, 2);
    std::fs::remove_file(&config).unwrap();
    replace(&config);
    // SAFETY: kill(2) on a child process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let before = consumed(&out).len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumed(&out).len() < before + 5 {
        let rss = rss_kib(child.id());
        if rss > RELOAD_RSS_LIMIT_KIB || Instant::now() > deadline {
            kill_and_fail(
                child,
                &format!(
                    "RSS {rss} KiB, {} batches consumed since the SIGHUP",
                    consumed(&out).len() - before
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopping = Instant::now();
    let log = signal_and_expect_success(child, libc::SIGTERM, Duration::from_secs(15));
    assert!(stopping.elapsed() < Duration::from_secs(10), "{log}");
    let expected = format!(
        "reload refused, the running configuration stays: config file {}: {reason}",
        config.display()
    );
    assert!(log.contains(&expected), "{expected}\nnot in\n{log}");
}

fn kill_and_fail(mut child: Child, why: &str) -> ! {
    let _ = child.kill();
    let log = text(&child.wait_with_output().unwrap());
    panic!("after the SIGHUP: {why}\n{log}");
}

#[test]
fn a_config_path_linked_to_dev_zero_at_sighup_is_refused_and_delivery_goes_on() {
    a_reload_from_a_path_turned_into(
        |config| std::os::unix::fs::symlink("/dev/zero", config).unwrap(),
        "a character device, not a regular file: refused",
    );
}

#[test]
fn a_config_path_turned_into_a_fifo_at_sighup_is_refused_and_delivery_goes_on() {
    a_reload_from_a_path_turned_into(
        |config| {
            let path = std::ffi::CString::new(config.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: mkfifo(3) on a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        },
        "a FIFO, not a regular file: refused",
    );
}

#[test]
fn the_native_eval_frame_stays_when_the_python_walk_finds_nothing() {
    require_root();
    let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_python.c");
    let python = dir.path().join("python3.12");
    let status = Command::new("cc")
        .args(["-O0", "-fno-omit-frame-pointer", "-o"])
        .arg(&python)
        .arg(&source)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling fake_python.c");
    let workload = Workload::start(&python, &[]);
    let (batches, log) = profile(
        dir.path(),
        "frequency_hz = 99\ncomms = [\"python3.12\"]",
        9.0,
    );
    let pid = workload.pid();
    drop(workload);
    let stacks = stacks_of(&batches, |p| p == pid);
    let spinning: Vec<&Vec<String>> = stacks
        .iter()
        .filter(|s| s.iter().any(|f| f == "fake_python_spin"))
        .collect();
    assert!(spinning.len() >= 30, "{} stacks\n{log}", spinning.len());
    let chain = ["fake_python_spin", "_PyEval_EvalFrameDefault", "main"];
    let whole = spinning
        .iter()
        .filter(|s| holds_in_order(s, &chain))
        .count();
    assert_eq!(
        whole,
        spinning.len(),
        "stacks without {chain:?}: {:?}",
        spinning
            .iter()
            .filter(|s| !holds_in_order(s, &chain))
            .take(3)
            .collect::<Vec<_>>()
    );
}
