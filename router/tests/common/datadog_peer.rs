//! Datadog's test agent (`ddapm-test-agent`, PyPI) as a test peer, and the decoding of what
//! it stored: multipart, event.json, pprof (read with `go tool pprof`).

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use base64::Engine;

use super::{free_port, wait_for_port, Peer};

/// Datadog's test agent on `port` (its OTLP ports moved out of the way too).
pub fn test_agent(port: u16) -> Peer {
    let agent = Command::new("python3")
        .args(["-m", "ddapm_test_agent.agent"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--otlp-http-port",
            &free_port().to_string(),
            "--otlp-grpc-port",
            &free_port().to_string(),
        ])
        .args(["--web-ui-port", &free_port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ddapm-test-agent (scripts/setup.sh --test installs it)");
    let peer = Peer(agent);
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "test agent did not start"
    );
    peer
}

/// One upload as the test agent stored it, decoded.
pub struct StoredUpload {
    pub headers: HashMap<String, String>,
    pub url: String,
    pub parts: Vec<Part>,
}

pub struct Part {
    pub name: String,
    pub filename: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

impl StoredUpload {
    pub fn part(&self, name: &str) -> &Part {
        self.parts
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no part {name}"))
    }
    pub fn event(&self) -> serde_json::Value {
        serde_json::from_slice(&self.part("event").data).unwrap()
    }
}

pub fn stored_uploads(port: u16) -> Vec<StoredUpload> {
    let url = format!("http://127.0.0.1:{port}/test/session/requests");
    let requests: Vec<serde_json::Value> =
        serde_json::from_str(&reqwest::blocking::get(url).unwrap().text().unwrap()).unwrap();
    requests
        .into_iter()
        .filter(|r| {
            r["url"]
                .as_str()
                .unwrap_or_default()
                .contains("/profiling/v1/input")
        })
        .map(|r| {
            let headers: HashMap<String, String> = r["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_ascii_lowercase(),
                        v.as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            let body = base64::engine::general_purpose::STANDARD
                .decode(r["body"].as_str().unwrap())
                .unwrap();
            let parts = parse_multipart(&headers["content-type"], &body);
            StoredUpload {
                headers,
                url: r["url"].as_str().unwrap().to_owned(),
                parts,
            }
        })
        .collect()
}

/// A multipart/form-data body, split into its parts (RFC 7578).
pub fn parse_multipart(content_type: &str, body: &[u8]) -> Vec<Part> {
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("a boundary")
        .trim_matches('"');
    let delimiter = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut chunks = split_bytes(body, &delimiter);
    chunks.remove(0);
    for chunk in chunks {
        if chunk.starts_with(b"--") {
            break;
        }
        let chunk = chunk.strip_prefix(b"\r\n").unwrap();
        let split = chunk.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&chunk[..split]).to_string();
        let data = chunk[split + 4..].strip_suffix(b"\r\n").unwrap().to_vec();
        let disposition = head.lines().next().unwrap_or_default().to_owned();
        let field = |key: &str| {
            disposition
                .split(';')
                .find_map(|p| {
                    p.trim()
                        .strip_prefix(&format!("{key}=\""))
                        .map(|v| v.trim_end_matches('"').to_owned())
                })
                .unwrap_or_default()
        };
        let content_type = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Content-Type: ")
                    .or_else(|| l.strip_prefix("content-type: "))
            })
            .unwrap_or_default()
            .to_owned();
        parts.push(Part {
            name: field("name"),
            filename: field("filename"),
            content_type,
            data,
        });
    }
    parts
}

fn split_bytes<'a>(haystack: &'a [u8], needle: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        if &haystack[i..i + needle.len()] == needle {
            out.push(&haystack[start..i]);
            i += needle.len();
            start = i;
        } else {
            i += 1;
        }
    }
    out.push(&haystack[start..]);
    out
}

/// `go tool pprof -raw` of a (decompressed) pprof.
pub fn go_pprof_raw(dir: &Path, pprof: &[u8]) -> String {
    go_pprof(dir, pprof, "-raw")
}

/// What `go tool pprof REPORT` prints for a (decompressed) pprof (`-raw`, `-traces`).
pub fn go_pprof(dir: &Path, pprof: &[u8], report: &str) -> String {
    let file = dir.join(format!("profile-{}.pb", pprof.len()));
    std::fs::write(&file, pprof).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", report])
        .arg(&file)
        .env("HOME", dir)
        .output()
        .expect("go (scripts/setup.sh --test installs golang-go)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The traces of `go tool pprof -traces` output, each as its lines (labels, then frames).
pub fn pprof_trace_blocks(traces: &str) -> Vec<Vec<&str>> {
    traces
        .split("-----------+-------------------------------------------------------")
        .skip(1)
        .map(|block| block.lines().filter(|l| !l.trim().is_empty()).collect())
        .collect()
}

/// Total of the first sample value (cpu-samples) in `go tool pprof -raw` output.
pub fn pprof_raw_total_samples(raw: &str) -> u64 {
    raw.split("Locations")
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split(':')
                .next()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// `go tool pprof -traces`: each trace's weight (in hundredths of its unit) and frames, leaf
/// first, with the raw output.
pub fn pprof_traces(dir: &Path, pprof: &[u8]) -> (Vec<(u64, Vec<String>)>, String) {
    let output = go_pprof(dir, pprof, "-traces");
    let traces = pprof_trace_blocks(&output)
        .into_iter()
        .filter_map(|lines| {
            // Label lines ("thread id:  8867") come first; the first frame line starts
            // with the trace's weight.
            let mut frames = lines.into_iter().filter(|l| !l.contains(":  "));
            let mut first = frames.next()?.split_whitespace();
            // "5.03ms": in hundredths of its unit, so that shares stay exact enough.
            let weight: f64 = first
                .next()?
                .trim_end_matches(|c: char| c.is_alphabetic())
                .parse()
                .ok()?;
            let weight = (weight * 100.0).round() as u64;
            let mut names = vec![first.collect::<Vec<_>>().join(" ")];
            names.extend(frames.map(|l| l.trim().to_owned()));
            Some((weight, names))
        })
        .collect();
    (traces, output)
}

/// The pprof of every upload the test agent stored, decompressed.
pub fn uploaded_pprofs(port: u16) -> Vec<Vec<u8>> {
    stored_uploads(port)
        .iter()
        .map(|upload| zstd::decode_all(&upload.part("cpu.pprof").data[..]).unwrap())
        .collect()
}
