//! An independent OTLP profiles receiver (tests/peers/otlp_receiver.py, on the official
//! `opentelemetry-proto` and `grpcio` Python packages) as a test peer.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

use super::{free_port, Peer};

/// The receiver: its ports and the file of decoded requests.
pub struct Receiver {
    _peer: Peer,
    /// gRPC port.
    pub grpc_port: u16,
    /// HTTP port.
    pub http_port: u16,
    out: PathBuf,
}

impl Receiver {
    /// Starts it on free ports; the first `fail_first` requests get UNAVAILABLE / 503.
    pub fn start(dir: &Path, fail_first: u32) -> Receiver {
        Self::start_on(dir, free_port(), free_port(), fail_first)
    }

    /// Starts it on free ports, serving TLS with `chain` and `key` (PEM files).
    pub fn start_tls(dir: &Path, chain: &Path, key: &Path) -> Receiver {
        let tls = [
            "--tls-cert".as_ref(),
            chain.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ];
        Self::launch(dir, free_port(), free_port(), 0, &tls)
    }

    /// Starts it on the given ports.
    pub fn start_on(dir: &Path, grpc_port: u16, http_port: u16, fail_first: u32) -> Receiver {
        Self::launch(dir, grpc_port, http_port, fail_first, &[])
    }

    fn launch(
        dir: &Path,
        grpc_port: u16,
        http_port: u16,
        fail_first: u32,
        extra: &[&std::ffi::OsStr],
    ) -> Receiver {
        let out = dir.join(format!("received-{grpc_port}.jsonl"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/otlp_receiver.py");
        let cache = std::env::var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
        let python = cache.join("profile-router/otlp-peer/bin/python");
        let mut child = Command::new(python)
            .arg(script)
            .args([
                "--grpc-port",
                &grpc_port.to_string(),
                "--http-port",
                &http_port.to_string(),
            ])
            .args(["--fail-first", &fail_first.to_string(), "--out"])
            .arg(&out)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the OTLP receiver's Python environment (scripts/setup.sh --test creates it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the receiver did not start");
        Receiver {
            _peer: Peer(child),
            grpc_port,
            http_port,
            out,
        }
    }

    /// The decoded requests so far.
    /// Every sample received: its weight (timestamps) and the names of its frames whose
    /// `profile.frame.type` `keep` accepts, leaf first.
    pub fn stacks(&self, keep: impl Fn(&str) -> bool) -> Vec<(u64, Vec<String>)> {
        self.requests()
            .iter()
            .flat_map(|r| r["resources"].as_array().unwrap().clone())
            .flat_map(|res| res["samples"].as_array().unwrap().clone())
            .map(|s| {
                let names = s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|f| keep(f["type"].as_str().unwrap_or_default()))
                    .map(|f| f["name"].as_str().unwrap_or_default().to_owned())
                    .collect();
                (s["timestamps"].as_array().unwrap().len() as u64, names)
            })
            .collect()
    }

    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}
