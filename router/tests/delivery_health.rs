//! Delivery as an operator sees it, with the real router: a backend that fails gets one attempt
//! per backoff however fast profiles queue, the queue keeps to its byte budget (shown on
//! `/metrics`), and `/healthz` names a consumer whose deliveries fail or whose delivery thread
//! died, until it delivers again.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A config that replays `batches` of 10 s each at `speed`, with telemetry on `port` and the
/// given consumer tables.
fn config(dir: &Path, batches: usize, speed: f64, port: u16, consumers: &str) -> PathBuf {
    let recording = write_recording(dir, &small_batches(batches));
    write_config(
        dir,
        &format!(
            "shutdown_timeout = \"2s\"\n[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = {speed}\n{consumers}",
            recording.display()
        ),
    )
}

/// A Datadog consumer table uploading one profile per batch to the scripted `server`.
fn datadog_table(server: &ScriptedServer, extra: &str) -> String {
    format!(
        "[consumers.datadog]\nagent_url = \"http://127.0.0.1:{}/profiling/v1/input\"\nupload_interval = \"10s\"\n{extra}\n",
        server.port
    )
}

fn get(port: u16, path: &str) -> (u16, String) {
    let response = reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")).unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

/// The value of the sample `series` (`name{labels}`) in a `/metrics` text.
fn metric(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{exposition}"))
}

/// Polls `/healthz` until `wanted` accepts its status and body; returns the body.
fn healthz_until(port: u16, what: &str, wanted: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(port, "/healthz");
        if wanted(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never came: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(child: Child) -> String {
    signal_and_expect_success(child, libc::SIGTERM, LIMIT)
}

#[test]
fn a_failing_backend_gets_one_attempt_per_backoff_and_its_queue_keeps_to_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let backend = ScriptedServer::start(vec![Reply::Status(503, "overloaded")]);
    let port = free_port();
    // A profile every 100 ms for 10 s; the backoff is 1 s to 2 s (2 s with jitter, capped).
    let table = datadog_table(
        &backend,
        "retry_backoff = \"2s\"\nretry_max_backoff = \"2s\"\nmax_queue_bytes = \"4KiB\"",
    );
    let child = spawn_router(&config(dir.path(), 100, 100.0, port, &table), &[]);
    assert!(wait_for_port(port, Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while backend.requests().is_empty() {
        assert!(Instant::now() < deadline, "no upload attempt came");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(4));
    let attempts = backend.requests().len();
    let (_, exposition) = get(port, "/metrics");
    let log = stop(child);

    // About 40 profiles were queued meanwhile; each must not have cut the backoff short.
    assert!(
        (2..=5).contains(&attempts),
        "{attempts} attempts in 4 s with a backoff of at least 1 s:\n{log}"
    );
    let series = |name: &str| metric(&exposition, &format!("{name}{{consumer=\"datadog\"}}"));
    let queued_bytes = series("router_plugin_queued_bytes");
    assert!(
        queued_bytes > 0.0 && queued_bytes <= 4096.0,
        "queued bytes {queued_bytes}, budget 4 KiB:\n{exposition}"
    );
    assert!(
        series("router_plugin_dropped_profiles_total") > 0.0,
        "a 4 KiB budget cannot hold 40 profiles:\n{exposition}"
    );
    assert!(log.contains("upload queue full"), "{log}");
}

#[test]
fn healthz_names_a_consumer_whose_uploads_fail_until_one_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let backend = ScriptedServer::start(vec![Reply::Status(503, "overloaded")]);
    let port = free_port();
    let table = datadog_table(
        &backend,
        "retry_backoff = \"50ms\"\nretry_max_backoff = \"100ms\"",
    );
    let child = spawn_router(&config(dir.path(), 60, 20.0, port, &table), &[]);
    assert!(wait_for_port(port, Duration::from_secs(30)));

    let body = healthz_until(port, "503 naming the failing uploads", |status, body| {
        status == 503 && body.contains("consumer datadog: its last")
    });
    assert!(
        body.contains(
            "delivery attempts failed, the last with: HTTP 503 Service Unavailable: overloaded"
        ),
        "{body}"
    );
    // The router's calls into the plugin all succeeded; the failed attempts are the plugin's.
    let (_, exposition) = get(port, "/metrics");
    let series = |name: &str| metric(&exposition, &format!("{name}{{consumer=\"datadog\"}}"));
    assert_eq!(series("router_consumer_calls_failed_total"), 0.0);
    assert!(series("router_plugin_retries_total") >= 3.0, "{exposition}");

    backend.set_replies(vec![Reply::Status(200, "ok")]);
    healthz_until(port, "200 after an upload got through", |status, body| {
        status == 200 && body == "ok\n"
    });
    stop(child);
}

#[test]
fn healthz_names_a_consumer_whose_delivery_thread_panicked() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let output = dir.path().join("worker.jsonl");
    let table = test_consumer_table("worker", &output, "worker_panics_on_batch = 2");
    let child = spawn_router(&config(dir.path(), 20, 20.0, port, &table), &[]);
    assert!(wait_for_port(port, Duration::from_secs(30)));
    healthz_until(port, "503 naming the dead thread", |status, body| {
        status == 503
            && body.contains(
                "consumer worker: thread test-worker panicked: told to panic in the worker on batch 2",
            )
    });
    stop(child);
}
