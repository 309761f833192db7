//! The out-of-tree example plugin (examples/third-party-consumer), built with its own
//! `cargo build`, loaded by the real router next to the Datadog and perf.data consumers.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{datadog_peer::*, *};

#[test]
fn the_example_plugin_builds_on_its_own_and_writes_one_line_per_batch() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/third-party-consumer");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/third-party");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(example.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the example plugin builds with its own cargo build"
    );
    let plugin = target.join("debug/libjsonl_summary_consumer.so");

    let dir = tempfile::tempdir().unwrap();
    let batches = small_batches(3);
    let recording = write_recording(dir.path(), &batches);
    let summary = dir.path().join("summary.jsonl");
    let dd_port = free_port();
    let _agent = test_agent(dd_port);
    let config = write_config(
        dir.path(),
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n\n[consumers.summary]\nplugin = \"{}\"\noutput = \"{}\"\n\n[consumers.datadog]\nagent_url = \"http://127.0.0.1:{dd_port}/profiling/v1/input\"\n\n[consumers.perfdata]\npath = \"{}\"\n",
            recording.display(),
            plugin.display(),
            summary.display(),
            dir.path().join("profiles").display()
        ),
    );
    let check = run_with_limit(
        router().arg("--check").arg("--config").arg(&config),
        Duration::from_secs(30),
    );
    let listing = text(&check);
    assert!(check.status.success(), "{listing}");
    assert!(
        listing.contains(&format!(
            "ok: consumer summary (plugin {}, summary 0.1.0, contract v2)",
            plugin.display()
        )),
        "{listing}"
    );
    assert!(listing.contains("ok: consumer datadog ("), "{listing}");
    assert!(listing.contains("ok: consumer perfdata ("), "{listing}");

    let out = run_with_limit(
        router().arg("--config").arg(&config),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&summary)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one line per batch");
    for (line, batch) in lines.iter().zip(&batches) {
        assert_eq!(line["start_ns"], batch.start_ns);
        assert_eq!(line["samples"], batch.samples.len());
        assert_eq!(line["events"], batch.total_events());
        assert_eq!(line["processes"], batch.processes.len());
    }
    assert_eq!(
        stored_uploads(dd_port).len(),
        1,
        "the Datadog consumer ran beside it"
    );
}
