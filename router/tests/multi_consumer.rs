//! Datadog, OTLP and perf.data consumers configured together in one agent.toml all receive the
//! same samples, each read back by its own independent peer.

mod common;

use std::{process::Command, time::Duration};

use common::{datadog_peer::*, otlp_peer::Receiver, *};

#[test]
fn datadog_otlp_and_perfdata_side_by_side_receive_the_same_samples() {
    let dir = tempfile::tempdir().unwrap();
    let batches = small_batches(4);
    let total: u64 = batches.iter().map(|b| b.total_events()).sum();
    let dd_port = free_port();
    let _agent = test_agent(dd_port);
    let receiver = Receiver::start(dir.path(), 0);
    let profiles = dir.path().join("profiles");
    let recording = write_recording(dir.path(), &batches);
    let config = write_config(
        dir.path(),
        &format!(
            r#"[producer]
kind = "replay"
replay.path = "{}"

[consumers.datadog]
agent_url = "http://127.0.0.1:{dd_port}/profiling/v1/input"
service = "multi"

[consumers.otlp]
endpoint = "http://127.0.0.1:{}"

[consumers.perfdata]
path = "{}"
"#,
            recording.display(),
            receiver.grpc_port,
            profiles.display()
        ),
    );
    let log = expect_success(run_with_limit(
        router().arg("--config").arg(&config),
        Duration::from_secs(120),
    ));
    for name in ["datadog", "otlp", "perfdata"] {
        assert!(
            log.contains(&format!("consumer {name} started and registered")),
            "{log}"
        );
        assert!(
            log.contains("received=4 delivered=4 dropped=0 failed=0"),
            "{log}"
        );
    }

    // Datadog: one merged 60 s profile, read by go tool pprof.
    let uploads = stored_uploads(dd_port);
    let datadog_total: u64 = uploads
        .iter()
        .map(|u| {
            let pprof = zstd::decode_all(&u.part("cpu.pprof").data[..]).unwrap();
            pprof_raw_total_samples(&go_pprof_raw(dir.path(), &pprof))
        })
        .sum();

    // OTLP: one timestamp per event, decoded by the official proto package.
    let otlp_total: u64 = receiver
        .requests()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap().clone())
        .flat_map(|res| res["samples"].as_array().unwrap().clone())
        .map(|s| s["timestamps"].as_array().unwrap().len() as u64)
        .sum();

    // perf.data: one SAMPLE record per event, counted by perf script.
    let data: Vec<_> = std::fs::read_dir(&profiles)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    let perf_total: u64 = data
        .iter()
        .map(|file| {
            let out = Command::new("perf")
                .args(["script", "-F", "pid", "-i"])
                .arg(file)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count() as u64
        })
        .sum();

    assert_eq!(
        (datadog_total, otlp_total, perf_total),
        (total, total, total)
    );
}
