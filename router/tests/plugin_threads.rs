//! A plugin's threads: checking a configuration builds the consumers and starts none of
//! their threads; `start` starts them and `shutdown` stops every one. The Datadog and OTLP
//! plugins are loaded into this process, whose threads are counted (the tests of this binary
//! run one at a time, so none starts threads meanwhile). Also: each consumer's log lines carry
//! its own name.

mod common;

use std::{sync::Mutex, time::Duration};

use abi_stable::std_types::RResult;
use common::*;
use router::plugin_host::load_consumer;

/// The tests here run one at a time: the first counts this process's threads.
static ALONE: Mutex<()> = Mutex::new(());

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The names of this process's threads, for the messages.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .collect()
}

/// Waits up to two seconds for the thread count to be at most `expected` (threads end a
/// moment after they are told to; the harness's thread of the other test may end meanwhile).
fn settles_at(expected: usize) -> usize {
    for _ in 0..200 {
        if threads() <= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    threads()
}

#[test]
fn a_check_starts_no_plugin_thread_and_shutdown_stops_every_one() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let datadog = plugin("consumer_datadog");
    let otlp = plugin("consumer_otlp");
    // A backend nobody listens on: uploads fail and are retried, threads stay busy.
    let dead = free_port();
    let settings = [
        (
            "datadog",
            &datadog,
            format!("agent_url = \"http://127.0.0.1:{dead}/profiling/v1/input\"\nupload_interval = \"1s\""),
        ),
        (
            "otlp",
            &otlp,
            format!("endpoint = \"http://127.0.0.1:{dead}\"\nprotocol = \"grpc\""),
        ),
    ];
    let before = threads();
    let mut consumers: Vec<_> = settings
        .iter()
        .map(|(name, path, toml)| load_consumer(name, path, toml).expect("a valid configuration"))
        .collect();
    assert!(
        threads() <= before,
        "building (checking) the consumers started threads: {:?}",
        thread_names()
    );

    for c in &mut consumers {
        assert!(
            matches!(c.consumer.start(), RResult::ROk(())),
            "{} starts",
            c.name
        );
    }
    assert!(threads() > before, "started consumers run their threads");
    for batch in small_batches(2) {
        for c in &mut consumers {
            let _ = c.consumer.consume(&batch);
        }
    }
    for c in &mut consumers {
        let _ = c.consumer.flush(300);
        let stopped = c.consumer.shutdown(5_000);
        assert!(
            matches!(stopped, RResult::ROk(())),
            "{}: {stopped:?}",
            c.name
        );
    }
    assert!(
        settles_at(before) <= before,
        "threads left after shutdown: {:?}",
        thread_names()
    );

    // Dropping a consumer that was never started is as quiet.
    let unstarted = load_consumer("datadog", &datadog, &settings[0].2).unwrap();
    drop(unstarted);
    assert!(threads() <= before, "{:?}", thread_names());
}

#[test]
fn each_consumers_log_lines_carry_its_own_name() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(1));
    let dead = free_port();
    let table = |name: &str| {
        format!(
            "[consumers.{name}]\nplugin = \"{}\"\nagent_url = \"http://127.0.0.1:{dead}/profiling/v1/input\"\nupload_interval = \"1ms\"\n",
            plugin("consumer_datadog").display()
        )
    };
    let config = write_config(
        dir.path(),
        &format!(
            "shutdown_timeout = \"1s\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n{}{}",
            recording.display(),
            table("datadog-eu"),
            table("datadog-us")
        ),
    );
    let out = run_with_limit(
        router().arg("--config").arg(&config),
        Duration::from_secs(30),
    );
    let log = text(&out);
    for name in ["datadog-eu", "datadog-us"] {
        let tag = format!("plugin=\"datadog\" consumer=\"{name}\"");
        // From a router call (start) and from a thread the plugin started (its Agent check).
        for line in [
            "Datadog profiling consumer started",
            "Datadog Agent is not reachable",
        ] {
            assert!(
                log.lines().any(|l| l.contains(line) && l.contains(&tag)),
                "no `{line}` logged with {tag}:\n{log}"
            );
        }
    }
}
