//! The real router under hostile conditions: signals at any moment, SIGHUP reloads, a closed
//! log pipe, out-of-range settings, malformed recordings.

mod common;

use std::{
    os::unix::process::{CommandExt, ExitStatusExt},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A config replaying `recording` in real time ×50 (a batch every 200 ms) for minutes, with
/// `consumers` (TOML tables).
fn long_replay_config(dir: &Path, recording: &Path, consumers: &str) -> String {
    format!(
        "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 50\nreplay.repeat = 1000\n{consumers}",
        recording.display()
    )
    .replace("DIR", &dir.display().to_string())
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a child process we started.
    unsafe { libc::kill(child.id() as i32, signal) };
}

#[test]
fn a_sigterm_while_the_agent_starts_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(3));
    let out = dir.path().join("out.jsonl");
    let config = write_config(
        dir.path(),
        &long_replay_config(dir.path(), &recording, &test_consumer_table("c", &out, "")),
    );
    for delay_ms in [0, 5, 20, 50] {
        let mut command = router();
        command.arg("--config").arg(&config);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            })
        };
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        signal(&child, libc::SIGTERM);
        let output = wait_with_limit(child, LIMIT);
        assert!(
            output.status.success(),
            "SIGTERM {delay_ms} ms after start: {:?} (signal {:?})\n{}",
            output.status.code(),
            output.status.signal(),
            text(&output)
        );
    }
}

#[test]
fn sighup_swaps_changed_consumers_after_the_old_ones_flush_and_keeps_them_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(3));
    let (a, b, kept, added) = (
        dir.path().join("a.jsonl"),
        dir.path().join("b.jsonl"),
        dir.path().join("kept.jsonl"),
        dir.path().join("added.jsonl"),
    );
    let kept_table = test_consumer_table("kept", &kept, "");
    let write = |consumers: &str| {
        write_config(
            dir.path(),
            &long_replay_config(dir.path(), &recording, consumers),
        )
    };
    let config = write(&format!(
        "{}{kept_table}",
        test_consumer_table("main", &a, "")
    ));
    let child = spawn_router(&config, &[]);
    wait_for_consumed(&a, 2);

    // The table of `main` changes, `added` appears: `main` is replaced, `kept` untouched.
    write(&format!(
        "{}{kept_table}{}",
        test_consumer_table("main", &b, ""),
        test_consumer_table("added", &added, "")
    ));
    signal(&child, libc::SIGHUP);
    wait_for_consumed(&b, 2);
    wait_for_consumed(&added, 2);
    let old = consumer_lines(&a);
    let calls: Vec<_> = old.iter().map(|l| l["call"].as_str().unwrap()).collect();
    assert_eq!(calls[calls.len() - 2..], ["flush", "shutdown"], "{old:?}");
    let old_done = old.last().unwrap()["unix_ms"].as_u64();
    let new_first = consumed(&b)[0]["unix_ms"].as_u64();
    assert!(
        old_done <= new_first,
        "the old instance flushed before the new one took a batch"
    );

    // A configuration that does not load, then one whose plugin does not load: both refused,
    // the running consumers keep receiving.
    for bad in [
        format!("{}no_such_key = 1\n", test_consumer_table("main", &a, "")).replace(
            "[consumers.main]",
            "bogus_top_level_key = true\n[consumers.main]",
        ),
        test_consumer_table("main", &a, "").replace(
            &plugin("test_consumer").display().to_string(),
            "/nonexistent/libnothing.so",
        ),
    ] {
        let before = consumed(&b).len();
        write(&format!("{bad}{kept_table}"));
        signal(&child, libc::SIGHUP);
        wait_for_consumed(&b, before + 3);
    }
    let log = signal_and_expect_success(child, libc::SIGTERM, LIMIT);
    assert!(log.contains("reload: consumer main replaced"), "{log}");
    assert!(log.contains("reload: consumer added added"), "{log}");
    assert!(!log.contains("reload: consumer kept"), "{log}");
    assert_eq!(
        log.matches("reload refused, the running configuration stays")
            .count(),
        2,
        "{log}"
    );
    assert!(log.contains("bogus_top_level_key"), "{log}");
    assert!(log.contains("/nonexistent/libnothing.so"), "{log}");
    assert_eq!(
        consumer_lines(&a).len(),
        old.len(),
        "the old instance got nothing more"
    );
    let kept_calls = consumer_lines(&kept);
    assert_eq!(
        kept_calls
            .iter()
            .filter(|l| l["call"] == "shutdown")
            .count(),
        1,
        "kept ran throughout: {kept_calls:?}"
    );
}

#[test]
fn a_closed_log_pipe_loses_log_lines_not_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(3));
    let out = dir.path().join("out.jsonl");
    let port = free_port();
    let config = write_config(
        dir.path(),
        &format!(
            "log_level = \"debug\"\ntelemetry.listen = \"127.0.0.1:{port}\"\n{}",
            long_replay_config(dir.path(), &recording, &test_consumer_table("c", &out, ""))
        ),
    );
    let mut child = router()
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    wait_for_consumed(&out, 5);
    let metrics = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let lost: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("router_log_lines_lost_total "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(lost > 0.0, "{metrics}");
    signal(&child, libc::SIGTERM);
    let output = wait_with_limit(child, LIMIT);
    assert!(
        output.status.success(),
        "{:?} {:?}",
        output.status.code(),
        output.status.signal()
    );
    assert_eq!(consumer_lines(&out).last().unwrap()["call"], "shutdown");
}

#[test]
fn durations_that_would_overflow_are_refused_at_check() {
    let dir = tempfile::tempdir().unwrap();
    let huge = "\"18446744073709551615s\"";
    for (toml, key) in [
        (
            format!("[producer]\ninterval = {huge}\n"),
            "producer.interval",
        ),
        (format!("shutdown_timeout = {huge}\n"), "shutdown_timeout"),
        (
            format!("[consumers.datadog]\nretry_backoff = {huge}\n"),
            "retry_backoff",
        ),
        (
            format!(
                "[consumers.otlp]\nendpoint = \"http://127.0.0.1:1\"\nretry_max_backoff = {huge}\n"
            ),
            "retry_max_backoff",
        ),
        (
            format!(
                "[consumers.perfdata]\npath = \"{}\"\nrotate_interval = {huge}\n",
                dir.path().display()
            ),
            "rotate_interval",
        ),
    ] {
        let config = write_config(dir.path(), &toml);
        let output = run_with_limit(router().arg("--config").arg(&config).arg("--check"), LIMIT);
        let log = text(&output);
        assert!(!output.status.success(), "{toml}: {log}");
        assert!(
            output.status.code().is_some(),
            "{toml}: killed by a signal: {log}"
        );
        assert!(log.contains(key), "{toml}: {log}");
    }
}

#[test]
fn a_malformed_recording_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut batches = small_batches(3);
    batches[1].samples[0].stack = 999_999;
    let recording = write_recording(dir.path(), &batches);
    let config = write_config(
        dir.path(),
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n{}",
            recording.display(),
            test_consumer_table("c", &dir.path().join("out.jsonl"), "")
        ),
    );
    for args in [&["--check"][..], &[]] {
        let output = run_with_limit(router().arg("--config").arg(&config).args(args), LIMIT);
        let log = text(&output);
        assert!(!output.status.success(), "{args:?}: {log}");
        assert!(log.contains("line 2"), "{args:?}: {log}");
        assert!(log.contains("samples[0].stack"), "{args:?}: {log}");
    }
}

#[test]
fn an_invalid_log_filter_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "log_level = \"router=loud\"\n");
    let output = run_with_limit(router().arg("--config").arg(&config).arg("--check"), LIMIT);
    let log = text(&output);
    assert_eq!(output.status.code(), Some(2), "{log}");
    assert!(log.contains("log_level = \"router=loud\""), "{log}");
}
