//! Helpers shared by the router's integration tests: build the plugins, write recordings,
//! run the real `router` binary with a deadline.
#![allow(dead_code)]

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use plugin_api::{
    fixtures::{synthetic_batch, BatchShape},
    ProfileBatch,
};

/// The real router binary.
pub fn router_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_router"))
}

/// The folder with the router and the workspace's plugins, built once per test run.
pub fn plugin_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--quiet",
            "-p",
            "test-consumer",
            "-p",
            "other-contract-consumer",
            "-p",
            "consumer-perfdata",
            "-p",
            "consumer-datadog",
            "-p",
            "consumer-otlp",
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the plugins");
        assert!(status.success(), "building the plugins failed");
        router_bin().parent().unwrap().to_owned()
    })
}

/// Path of a plugin built by this workspace.
pub fn plugin(lib_name: &str) -> PathBuf {
    plugin_dir().join(format!("lib{lib_name}.so"))
}

/// Small synthetic batches, `count` of them, one after the other in time.
pub fn small_batches(count: usize) -> Vec<ProfileBatch> {
    let shape = BatchShape {
        samples: 200,
        unique_stacks: 20,
        depth: 8,
        processes: 3,
        kernel_frames: 2,
    };
    (0..count)
        .map(|i| synthetic_batch(shape, 1_700_000_000_000_000_000 + i as u64 * 10_000_000_000))
        .collect()
}

/// Writes `batches` as a recording in `dir`.
pub fn write_recording(dir: &Path, batches: &[ProfileBatch]) -> PathBuf {
    let path = dir.join("recording.jsonl");
    let text: String = batches
        .iter()
        .map(|b| serde_json::to_string(b).unwrap() + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes `text` as `agent.toml` in `dir`.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A `[consumers.NAME]` table for the test consumer writing to `output`.
pub fn test_consumer_table(name: &str, output: &Path, extra: &str) -> String {
    format!(
        "[consumers.{name}]\nplugin = \"{}\"\noutput = \"{}\"\n{extra}\n",
        plugin("test_consumer").display(),
        output.display()
    )
}

/// A router command with a clean environment for our variables.
pub fn router() -> Command {
    let mut cmd = Command::new(router_bin());
    for (key, _) in std::env::vars() {
        if key.starts_with("ROUTER_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start router");
    wait_with_limit(child, limit)
}

/// Waits for `child`, killing it after `limit` (the test then fails on its status).
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut out = child.wait_with_output().unwrap();
            out.stderr
                .extend_from_slice(b"\n[test: killed after the time limit]");
            return out;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stdout and stderr of a finished run, as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The JSON lines the test consumer wrote.
pub fn consumer_lines(path: &Path) -> Vec<serde_json::Value> {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        f.read_to_string(&mut text).unwrap();
    }
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `consume` lines among them.
pub fn consumed(path: &Path) -> Vec<serde_json::Value> {
    consumer_lines(path)
        .into_iter()
        .filter(|l| l["call"] == "consume")
        .collect()
}
