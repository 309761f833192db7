//! The Datadog consumer against Datadog's own test agent (`ddapm-test-agent`, PyPI), decoded
//! here and read back with `go tool pprof`; failure modes against a scripted HTTP server.

mod common;

use std::{path::Path, time::Duration};

use common::{datadog_peer::*, *};
use plugin_api::ProfileBatch;

const LIMIT: Duration = Duration::from_secs(120);

fn replay_config(
    dir: &Path,
    batches: &[ProfileBatch],
    speed: f64,
    datadog: &str,
) -> std::path::PathBuf {
    let recording = write_recording(dir, batches);
    write_config(
        dir,
        &format!(
            "shutdown_timeout = \"20s\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = {speed}\n[consumers.datadog]\n{datadog}\n",
            recording.display()
        ),
    )
}

fn is_rfc3339_nanos_utc(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 30
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && s.ends_with('Z')
        && s[20..29].bytes().all(|c| c.is_ascii_digit())
}

#[test]
fn uploads_reach_datadogs_test_agent_in_the_intake_format() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _agent = test_agent(port);
    let batches = small_batches(3);
    let config = replay_config(
        dir.path(),
        &batches,
        0.0,
        &format!(
            "agent_url = \"http://127.0.0.1:{port}/profiling/v1/input\"\nservice = \"checkout\"\nversion = \"1.2.3\"\ntags = [\"team:perf\"]\nupload_interval = \"10s\""
        ),
    );
    let log = expect_success(run_with_limit(
        router()
            .arg("--config")
            .arg(&config)
            .env("DD_TAGS", "region:eu"),
        LIMIT,
    ));
    assert!(
        log.contains("Datadog profiling consumer started and registered"),
        "{log}"
    );
    assert!(log.contains("uploading profiles to Datadog"), "{log}");
    assert!(log.contains("batch_size=1"), "{log}");

    let uploads = stored_uploads(port);
    assert_eq!(uploads.len(), 3, "one profile per 10 s batch");
    for (i, (upload, batch)) in uploads.iter().zip(&batches).enumerate() {
        assert!(upload.url.ends_with("/profiling/v1/input"));
        assert_eq!(upload.headers["dd-evp-origin"], "profile-router");
        assert_eq!(
            upload.headers["dd-evp-origin-version"],
            env!("CARGO_PKG_VERSION")
        );
        assert!(
            !upload.headers.contains_key("dd-api-key"),
            "never to the agent"
        );
        assert_eq!(upload.parts.len(), 2);
        let event_part = upload.part("event");
        assert_eq!(event_part.filename, "event.json");
        assert_eq!(event_part.content_type, "application/json");

        let event = upload.event();
        assert_eq!(event["attachments"], serde_json::json!(["cpu.pprof"]));
        assert_eq!(
            event["version"],
            serde_json::json!("4"),
            "version is the string \"4\""
        );
        assert_eq!(event["family"], "ebpf");
        let start = event["start"].as_str().expect("start is a string");
        let end = event["end"].as_str().expect("end is a string");
        assert!(
            is_rfc3339_nanos_utc(start) && is_rfc3339_nanos_utc(end),
            "{start} {end}"
        );
        assert!(start < end);
        let tags = event["tags_profiler"]
            .as_str()
            .expect("tags_profiler is one string");
        let tags: Vec<&str> = tags.split(',').collect();
        for want in [
            "service:checkout".to_owned(),
            "version:1.2.3".to_owned(),
            "host:synthetic-host".to_owned(),
            "runtime:ebpf".to_owned(),
            "profiler_name:profile-router".to_owned(),
            format!("profiler_version:{}", env!("CARGO_PKG_VERSION")),
            "cpu_arch:x86_64".to_owned(),
            format!("profile_seq:{}", i + 1),
            "team:perf".to_owned(),
            "region:eu".to_owned(),
        ] {
            assert!(tags.contains(&want.as_str()), "{want} in {tags:?}");
        }
        assert!(
            !tags.iter().any(|t| t.starts_with("env:")),
            "env only when set"
        );
        for name in event["attachments"].as_array().unwrap() {
            let part = upload.part(name.as_str().unwrap());
            assert_eq!(part.filename, name.as_str().unwrap());
        }

        let compressed = &upload.part("cpu.pprof").data;
        assert_eq!(&compressed[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd");
        let pprof = zstd::decode_all(&compressed[..]).unwrap();
        let raw = go_pprof_raw(dir.path(), &pprof);
        assert!(raw.contains("PeriodType: cpu-time nanoseconds"), "{raw}");
        assert!(
            raw.contains(&format!("Period: {}", batch.period_ns)),
            "{raw}"
        );
        assert!(
            raw.contains("cpu-samples/count cpu-time/nanoseconds"),
            "{raw}"
        );
        let total = pprof_raw_total_samples(&raw);
        assert_eq!(total, batch.total_events(), "{raw}");
        for name in ["main", "fn_2_0", "fn_6_3", "kfunc_0"] {
            assert!(raw.contains(name), "{name} in {raw}");
        }
        for label in [
            "process_id:[",
            "thread id:[",
            "thread name:[app",
            "process name:[app",
            "timestamp_ns:[",
        ] {
            assert!(raw.contains(label), "{label} in {raw}");
        }
    }
}

#[test]
fn a_backend_down_at_start_gets_the_queued_profiles_once_up_and_drops_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = replay_config(
        dir.path(),
        &small_batches(6),
        0.0,
        &format!(
            "agent_url = \"http://127.0.0.1:{port}/profiling/v1/input\"\nupload_interval = \"10s\"\nsplit_by_service = false\nmax_queue = 2\nretry_backoff = \"200ms\"\nretry_max_backoff = \"500ms\""
        ),
    );
    let child = spawn_router(&config, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let _agent = test_agent(port);
    let out = wait_with_limit(child, LIMIT);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("cannot connect"), "{log}");
    let seqs: Vec<String> = stored_uploads(port)
        .iter()
        .map(|u| {
            u.event()["tags_profiler"]
                .as_str()
                .unwrap()
                .split(',')
                .find(|t| t.starts_with("profile_seq:"))
                .unwrap()
                .to_owned()
        })
        .collect();
    // Profile 1 was being retried; of 2..=6 the queue kept the newest two.
    assert_eq!(
        seqs,
        ["profile_seq:1", "profile_seq:5", "profile_seq:6"],
        "{log}"
    );
    assert!(log.contains("uploaded=3 dropped=3 rejected=0"), "{log}");
}

#[test]
fn a_500_is_retried_a_400_is_not_and_a_hanging_backend_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let batches = small_batches(1);
    let run = |server: &ScriptedServer, extra: &str| {
        let config = replay_config(
            dir.path(),
            &batches,
            0.0,
            &format!("agent_url = \"http://127.0.0.1:{}/profiling/v1/input\"\nretry_backoff = \"100ms\"\n{extra}", server.port),
        );
        let out = run_with_limit(router().arg("--config").arg(&config), LIMIT);
        text(&out)
    };

    let flaky = ScriptedServer::start(vec![
        Reply::Status(500, "try later"),
        Reply::Status(200, "ok"),
    ]);
    let log = run(&flaky, "");
    let seen = flaky.requests();
    assert_eq!(seen.len(), 2, "{log}");
    let pprof_of = |r: &SeenRequest| {
        let parts = parse_multipart(r.header("content-type").unwrap(), &r.body);
        parts
            .into_iter()
            .find(|p| p.name == "cpu.pprof")
            .unwrap()
            .data
    };
    assert_eq!(
        pprof_of(&seen[0]),
        pprof_of(&seen[1]),
        "the same profile again"
    );
    assert!(
        log.contains("HTTP 500 Internal Server Error: try later; retrying"),
        "{log}"
    );
    assert!(
        log.contains("uploaded=1 dropped=0 rejected=0 retries=1"),
        "{log}"
    );

    let refusing = ScriptedServer::start(vec![Reply::Status(400, "malformed profile")]);
    let log = run(&refusing, "");
    assert_eq!(refusing.requests().len(), 1, "{log}");
    assert!(
        log.contains(
            "failed to upload profile #1: HTTP 400 Bad Request: malformed profile (not retried)"
        ),
        "{log}"
    );

    let old_agent = ScriptedServer::start(vec![Reply::Status(404, "")]);
    let log = run(&old_agent, "");
    assert!(
        log.contains("answered 404: no profiling endpoint there (a Datadog Agent older than 7.20"),
        "{log}"
    );

    let hanging = ScriptedServer::start(vec![Reply::Hang, Reply::Status(200, "ok")]);
    let log = run(&hanging, "timeout = \"1s\"");
    assert!(
        log.contains("failed to upload profile #1: timed out"),
        "{log}"
    );
    assert_eq!(
        hanging.requests().len(),
        2,
        "retried after the timeout: {log}"
    );
    assert!(log.contains("uploaded=1"), "{log}");
}

#[test]
fn sigterm_uploads_the_pending_profile_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _agent = test_agent(port);
    let config = replay_config(
        dir.path(),
        &small_batches(1),
        1.0,
        &format!("agent_url = \"http://127.0.0.1:{port}/profiling/v1/input\""),
    );
    let child = spawn_router(&config, &[]);
    std::thread::sleep(Duration::from_secs(2));
    signal_and_expect_success(child, libc::SIGTERM, LIMIT);
    let uploads = stored_uploads(port);
    assert_eq!(uploads.len(), 1);
    let pprof = zstd::decode_all(&uploads[0].part("cpu.pprof").data[..]).unwrap();
    let raw = go_pprof_raw(dir.path(), &pprof);
    assert!(raw.contains("main"), "{raw}");
}

#[test]
fn agentless_requests_carry_the_api_key_to_the_intake_path_and_no_log_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let intake = ScriptedServer::start(vec![Reply::Status(200, "{}")]);
    let key = "0123456789abcdef0123456789abcdef";
    let config = replay_config(
        dir.path(),
        &small_batches(1),
        0.0,
        &format!(
            "intake_url = \"http://127.0.0.1:{}/api/v2/profile\"\nsite = \"datadoghq.eu\"",
            intake.port
        ),
    );
    let log = expect_success(run_with_limit(
        router().arg("--config").arg(&config).env("DD_API_KEY", key),
        LIMIT,
    ));
    let seen = intake.requests();
    assert_eq!(seen.len(), 1, "{log}");
    assert!(
        seen[0].request_line.starts_with("POST /api/v2/profile "),
        "{:?}",
        seen[0].request_line
    );
    assert_eq!(seen[0].header("dd-api-key"), Some(key));
    assert!(!log.contains(key), "the key is in a log line: {log}");

    let printed = run_with_limit(
        router()
            .arg("--print-config")
            .arg("--config")
            .arg(&config)
            .env("ROUTER_CONSUMERS__DATADOG__API_KEY", key),
        LIMIT,
    );
    assert!(!text(&printed).contains(key));
}
