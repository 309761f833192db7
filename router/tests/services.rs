//! Each process lands under its own service, in its own container, on the node's name: three
//! workloads in three containers (cgroup v2 groups whose names carry 64-hex ids), read back by
//! Datadog's test agent and `go tool pprof`, and by the OTLP receiver. Needs root, as CI has.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{datadog_peer::*, otlp_peer::Receiver, sampling::*, *};

/// A workload's service as it should arrive, and how it is started.
struct Expected {
    binary: &'static str,
    env: Option<(&'static str, &'static str)>,
    service: &'static str,
    inferred: &'static str,
}

const WORKLOADS: [Expected; 3] = [
    Expected {
        binary: "alpha-bin",
        env: Some(("DD_SERVICE", "alpha")),
        service: "alpha",
        inferred: "no",
    },
    Expected {
        binary: "beta-bin",
        env: Some(("OTEL_SERVICE_NAME", "beta")),
        service: "beta",
        inferred: "no",
    },
    Expected {
        binary: "gamma-bin",
        env: None,
        service: "gamma-bin",
        inferred: "yes",
    },
];

/// A cgroup v2 group for the test with one child group per container, removed when dropped.
struct Containers {
    parent: PathBuf,
    children: Vec<(PathBuf, String)>,
}

impl Containers {
    fn create(count: usize) -> Containers {
        let parent = cgroup2_root().join(format!("profile-router-services-{}", std::process::id()));
        std::fs::create_dir(&parent).unwrap();
        let children = (0..count)
            .map(|i| {
                let id = format!("{:064x}", 0xc0ffee_u64 * 1000 + i as u64 + 1);
                let path = parent.join(format!("app-{id}.scope"));
                std::fs::create_dir(&path).unwrap();
                (path, id)
            })
            .collect();
        Containers { parent, children }
    }

    /// The parent group as /proc/PID/cgroup shows it (the producer's `cgroups` filter).
    fn name(&self) -> String {
        format!("/{}", self.parent.file_name().unwrap().to_str().unwrap())
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for (child, _) in &self.children {
            let _ = std::fs::remove_dir(child);
        }
        let _ = std::fs::remove_dir(&self.parent);
    }
}

/// `go tool pprof -traces` of a pprof: per trace, its root frame and its process_id labels.
fn traces(dir: &Path, pprof: &[u8]) -> Vec<(String, BTreeSet<String>)> {
    let output = go_pprof(dir, pprof, "-traces");
    pprof_trace_blocks(&output)
        .into_iter()
        .filter_map(|lines| {
            let pids = lines
                .iter()
                .filter_map(|l| l.trim().strip_prefix("process_id:"))
                .map(|pid| pid.trim().to_owned())
                .collect();
            let root = lines.last()?.split_whitespace().last()?.to_owned();
            Some((root, pids))
        })
        .collect()
}

#[test]
fn each_service_gets_its_own_upload_container_identity_and_resource_on_the_nodes_name() {
    require_root();
    // The router inherits it: the name a DaemonSet gives it from spec.nodeName.
    std::env::set_var("NODE_NAME", "node-7");
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/spin.c");
    for workload in &WORKLOADS {
        let status = Command::new("cc")
            .args(["-O2", "-o"])
            .arg(dir.path().join(workload.binary))
            .arg(&source)
            .status()
            .expect("run cc");
        assert!(status.success());
    }
    plugin_dir();
    let containers = Containers::create(WORKLOADS.len());
    let dd_port = free_port();
    let _agent = test_agent(dd_port);
    let receiver = Receiver::start(dir.path(), 0);
    let consumers = format!(
        "[consumers.datadog]\nagent_url = \"http://127.0.0.1:{dd_port}/profiling/v1/input\"\nupload_interval = \"2s\"\n\n[consumers.otlp]\nendpoint = \"http://127.0.0.1:{}\"\ngroup_by = \"service\"\n",
        receiver.grpc_port
    );
    let producer = format!("frequency_hz = 199\ncgroups = [\"{}\"]", containers.name());
    let (batches, log, workloads) = profile_started(dir.path(), &producer, &consumers, 6.0, || {
        WORKLOADS
            .iter()
            .zip(&containers.children)
            .map(|(workload, (group, _))| {
                let env = workload
                    .env
                    .map(|(k, v)| format!("{k}={v} "))
                    .unwrap_or_default();
                let script = format!(
                    "echo $$ > {}/cgroup.procs && exec env {env}{}",
                    group.display(),
                    dir.path().join(workload.binary).display()
                );
                Workload::start(Path::new("/bin/sh"), &["-c", &script])
            })
            .collect::<Vec<_>>()
    });
    let pids: Vec<u32> = workloads.iter().map(Workload::pid).collect();
    drop(workloads);
    assert_eq!(sampled_pids(&batches), sorted(&pids), "{log}");

    // Datadog: rounds of three uploads, one per service, each with its own container.
    let uploads = stored_uploads(dd_port);
    assert!(uploads.len() >= 3, "{} uploads\n{log}", uploads.len());
    let mut rounds: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut total = 0;
    for upload in &uploads {
        let event = upload.event();
        let tags: BTreeMap<&str, &str> = event["tags_profiler"]
            .as_str()
            .unwrap()
            .split(',')
            .filter_map(|t| t.split_once(':'))
            .collect();
        let (i, expected) = WORKLOADS
            .iter()
            .enumerate()
            .find(|(_, w)| tags["service"] == w.service)
            .unwrap_or_else(|| panic!("an upload of another service: {tags:?}"));
        assert_eq!(tags["service_inferred"], expected.inferred, "{tags:?}");
        assert_eq!(tags["host"], "node-7", "{tags:?}");
        let container = &containers.children[i].1;
        assert_eq!(
            upload.headers.get("datadog-entity-id").map(String::as_str),
            Some(format!("ci-{container}").as_str()),
            "{}",
            expected.service
        );
        rounds
            .entry(event["start"].as_str().unwrap().to_owned())
            .or_default()
            .push(expected.service.to_owned());
        let pprof = zstd::decode_all(&upload.part("cpu.pprof").data[..]).unwrap();
        let traces = traces(dir.path(), &pprof);
        assert!(!traces.is_empty(), "{}: an empty profile", expected.service);
        for (root, process_ids) in traces {
            assert_eq!(
                root, expected.binary,
                "{}: the root frame",
                expected.service
            );
            assert_eq!(
                process_ids,
                BTreeSet::from([pids[i].to_string()]),
                "{}: samples of its process only",
                expected.service
            );
        }
        total += pprof_raw_total_samples(&go_pprof_raw(dir.path(), &pprof));
    }
    // One upload per service in every interval; the last, cut short by the stop, may lack
    // a service that was not sampled in it.
    let full_rounds = rounds
        .iter()
        .map(|(start, services)| {
            let distinct: BTreeSet<&String> = services.iter().collect();
            assert_eq!(
                distinct.len(),
                services.len(),
                "two uploads of one service at {start}"
            );
            services.len()
        })
        .filter(|&n| n == WORKLOADS.len())
        .count();
    assert!(full_rounds >= 2, "{rounds:?}");
    let taken: usize = batches.iter().map(|b| b.samples.len()).sum();
    assert_eq!(total, taken as u64, "every sample uploaded once");

    // OTLP: one resource per service, on the node's name.
    let resources: BTreeSet<(String, String)> = receiver
        .requests()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap().clone())
        .map(|r| {
            let attribute = |key: &str| r["resource"][key].as_str().unwrap_or_default().to_owned();
            (attribute("service.name"), attribute("host.name"))
        })
        .collect();
    assert_eq!(
        resources,
        BTreeSet::from(["alpha", "beta", "gamma-bin"].map(|s| (s.to_owned(), "node-7".to_owned()))),
    );
}

fn sorted(pids: &[u32]) -> Vec<u32> {
    let mut pids = pids.to_vec();
    pids.sort();
    pids
}

#[test]
fn an_agent_without_the_profiling_endpoint_and_an_absent_one_are_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let old_agent = ScriptedServer::start_with_info(
        Reply::Status(
            200,
            r#"{"version": "7.19.2", "endpoints": ["/v0.4/traces", "/v0.5/traces"]}"#,
        ),
        vec![Reply::Status(404, "")],
    );
    let absent = free_port();
    for (port, expected) in [
        (
            old_agent.port,
            "the Datadog Agent 7.19.2 at http://127.0.0.1:PORT/info does not list /profiling/v1/input among its endpoints",
        ),
        (
            absent,
            "the Datadog Agent is not reachable at http://127.0.0.1:PORT/info",
        ),
    ] {
        let expected = expected.replace("PORT", &port.to_string());
        let telemetry = free_port();
        let recording = write_recording(dir.path(), &small_batches(3));
        let config = write_config(
            dir.path(),
            &format!(
                "shutdown_timeout = \"2s\"\n[telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 1.0\nreplay.repeat = 100\n[consumers.datadog]\nagent_url = \"http://127.0.0.1:{port}/profiling/v1/input\"\nretry_backoff = \"100ms\"\ntimeout = \"1s\"\n",
                recording.display()
            ),
        );
        let child = spawn_router(&config, &[]);
        assert!(wait_for_port(telemetry, Duration::from_secs(30)));
        // The check runs at start; its finding reaches /healthz after the next batch.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let health = loop {
            let response =
                reqwest::blocking::get(format!("http://127.0.0.1:{telemetry}/healthz")).unwrap();
            let status = response.status().as_u16();
            let body = response.text().unwrap();
            if status == 503 || std::time::Instant::now() > deadline {
                break (status, body);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(health.0, 503, "{}", health.1);
        assert!(health.1.contains("consumer datadog: ") && health.1.contains(&expected), "{}", health.1);
        let log = signal_and_expect_success(child, libc::SIGTERM, Duration::from_secs(30));
        assert_eq!(log.matches(&expected).count(), 1, "{log}");
    }
}
