//! The real router binary, real cdylib plugins, replayed batches.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn two_consumers_side_by_side_both_receive_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let batches = small_batches(5);
    let recording = write_recording(dir.path(), &batches);
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let config = write_config(
        dir.path(),
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n{}{}",
            recording.display(),
            test_consumer_table("first", &a, ""),
            test_consumer_table("second", &b, "")
        ),
    );
    let log = expect_success(run_with_limit(router().arg("--config").arg(&config), LIMIT));
    for (name, path) in [("first", &a), ("second", &b)] {
        assert!(
            log.contains(&format!("consumer {name} started and registered")),
            "{log}"
        );
        let lines = consumer_lines(path);
        let consumed: Vec<_> = lines.iter().filter(|l| l["call"] == "consume").collect();
        assert_eq!(consumed.len(), 5, "{name}: {lines:?}");
        for (line, batch) in consumed.iter().zip(&batches) {
            assert_eq!(line["start_ns"], batch.start_ns);
            assert_eq!(line["events"], batch.total_events());
        }
        let calls: Vec<_> = lines[5..]
            .iter()
            .map(|l| l["call"].as_str().unwrap())
            .collect();
        assert_eq!(calls, ["flush", "shutdown"], "{name}");
    }
}

#[test]
fn a_slow_consumer_does_not_delay_a_fast_one_and_its_drops_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(30));
    let (slow, fast) = (dir.path().join("slow.jsonl"), dir.path().join("fast.jsonl"));
    let config = write_config(
        dir.path(),
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n{}{}",
            recording.display(),
            test_consumer_table("slow", &slow, "sleep_ms = 200\nqueue_capacity = 2"),
            test_consumer_table("fast", &fast, "")
        ),
    );
    let log = expect_success(run_with_limit(router().arg("--config").arg(&config), LIMIT));

    let fast_lines = consumed(&fast);
    let slow_lines = consumed(&slow);
    assert_eq!(fast_lines.len(), 30, "the fast consumer got every batch");
    assert!(slow_lines.len() < 30, "the slow consumer dropped some");
    let fast_done = fast_lines.last().unwrap()["unix_ms"].as_u64().unwrap();
    let slow_second = slow_lines[1]["unix_ms"].as_u64().unwrap();
    assert!(
        fast_done < slow_second,
        "the fast consumer finished all 30 before the slow one took its second batch"
    );
    let dropped = 30 - slow_lines.len();
    assert!(
        log.contains("consumer queue full: dropped its oldest batch"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "received=30 delivered={} dropped={dropped} failed=0",
            slow_lines.len()
        )),
        "{log}"
    );
    assert!(
        log.contains("received=30 delivered=30 dropped=0 failed=0"),
        "{log}"
    );
}

#[test]
fn a_panicking_consumer_is_reported_and_the_others_keep_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(5));
    let (bad, good) = (dir.path().join("bad.jsonl"), dir.path().join("good.jsonl"));
    let config = write_config(
        dir.path(),
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n{}{}",
            recording.display(),
            test_consumer_table("bad", &bad, "panic_on_batch = 2"),
            test_consumer_table("good", &good, "")
        ),
    );
    let out = run_with_limit(router().arg("--config").arg(&config), LIMIT);
    let log = text(&out);
    assert!(out.status.success(), "the router survived: {log}");
    assert!(
        log.contains("plugin panicked in consume: told to panic on batch 2"),
        "{log}"
    );
    assert_eq!(consumed(&good).len(), 5);
    let bad_seqs: Vec<_> = consumed(&bad)
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        bad_seqs,
        [1, 3, 4, 5],
        "the panicking consumer keeps receiving"
    );
    assert!(
        log.contains("received=5 delivered=4 dropped=0 failed=1"),
        "{log}"
    );
}

#[test]
fn sigterm_mid_interval_delivers_the_partial_interval_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let batches = small_batches(1);
    let recording = write_recording(dir.path(), &batches);
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let config = write_config(
        dir.path(),
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 1.0\n{}{}",
            recording.display(),
            test_consumer_table("a", &a, ""),
            test_consumer_table("b", &b, "")
        ),
    );
    let child = spawn_router(&config, &[]);
    std::thread::sleep(Duration::from_millis(2500));
    let started = std::time::Instant::now();
    signal_and_expect_success(child, libc::SIGTERM, Duration::from_secs(20));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped promptly"
    );
    let full = batches[0].total_events();
    for path in [&a, &b] {
        let lines = consumer_lines(path);
        assert_eq!(lines.len(), 3, "consume, flush, shutdown: {lines:?}");
        let events = lines[0]["events"].as_u64().unwrap();
        assert!(
            events > 0 && events < full,
            "partial interval: {events} of {full}"
        );
        let seconds = (lines[0]["end_ns"].as_u64().unwrap()
            - lines[0]["start_ns"].as_u64().unwrap()) as f64
            / 1e9;
        assert!(
            (1.5..6.0).contains(&seconds),
            "cut where the signal came: {seconds}s"
        );
        assert_eq!(lines[1]["call"], "flush");
        assert_eq!(lines[2]["call"], "shutdown");
    }
}
