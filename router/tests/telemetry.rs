//! `/metrics` read with the Prometheus project's own Python parser, and `/healthz`.

mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// The samples of an OpenMetrics text, parsed by `prometheus_client` (PyPI), as
/// `{"name{label=value,...}": value}`.
fn parse_with_prometheus_client(text: &str) -> serde_json::Map<String, Value> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (scripts/setup.sh --test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text:\n{text}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn get(port: u16, path: &str) -> (u16, String) {
    let response = reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")).unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

#[test]
fn metrics_match_what_a_replay_delivered_and_a_failing_consumer_flips_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let batches = small_batches(4);
    let recording = write_recording(dir.path(), &batches);
    let port = free_port();
    let (good, bad) = (dir.path().join("good.jsonl"), dir.path().join("bad.jsonl"));
    let config = write_config(
        dir.path(),
        &format!(
            "[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 5.0\n[consumers.perfdata]\npath = \"{}\"\n{}{}",
            recording.display(),
            dir.path().join("profiles").display(),
            test_consumer_table("good", &good, ""),
            test_consumer_table("bad", &bad, "panic_on_batch = 3"),
        ),
    );
    let child = spawn_router(&config, &[]);
    assert!(wait_for_port(port, Duration::from_secs(30)));

    wait_for_consumed(&good, 1);
    wait_for_consumed(&bad, 1);
    let (status, body) = get(port, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    wait_for_consumed(&good, 3);
    // The bad consumer's third call panics on its own thread: wait until it has been counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (exposition, m) = loop {
        let (status, exposition) = get(port, "/metrics");
        assert_eq!(status, 200);
        let m = parse_with_prometheus_client(&exposition);
        if m["router_consumer_calls_failed_total{consumer=bad}"] == 1.0
            || std::time::Instant::now() > deadline
        {
            break (exposition, m);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let samples: usize = batches[..3].iter().map(|b| b.samples.len()).sum();
    assert_eq!(
        m["router_samples_collected_total{}"], samples as f64,
        "{exposition}"
    );
    assert_eq!(m["router_batches_published_total{}"], 3.0);
    assert_eq!(m["router_samples_lost_total{cause=ring_buffer_full}"], 0.0);
    assert_eq!(
        m["router_consumer_batches_delivered_total{consumer=good}"],
        3.0
    );
    assert_eq!(
        m["router_consumer_batches_received_total{consumer=bad}"],
        3.0
    );
    assert_eq!(
        m["router_consumer_batches_delivered_total{consumer=bad}"],
        2.0
    );
    assert_eq!(m["router_consumer_calls_failed_total{consumer=bad}"], 1.0);
    assert_eq!(
        m["router_consumer_batches_dropped_total{consumer=good}"],
        0.0
    );
    assert_eq!(m["router_consumer_queue_depth{consumer=good}"], 0.0);
    assert_eq!(
        m["router_plugin_files_written_total{consumer=perfdata}"], 0.0,
        "60 s files: none yet"
    );
    assert!(
        m["router_plugin_open_profile_bytes{consumer=perfdata}"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        m["router_process_resident_memory_bytes{}"]
            .as_f64()
            .unwrap()
            > 1e6
    );
    assert!(m.contains_key("router_process_cpu_seconds_total{}"));
    assert!(m.contains_key("router_symbol_cache_hits_total{}"));
    assert!(m.contains_key("router_symbol_cache_entries{}"));
    assert!(m.contains_key("router_symbol_files_unreadable_total{reason=permission_denied}"));

    let (status, body) = get(port, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("consumer bad failing: plugin panicked in consume: told to panic on batch 3"),
        "{body}"
    );

    let out = wait_with_limit(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out));
}
