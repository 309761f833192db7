//! The OTLP consumer against an independent receiver written with the official Python
//! `opentelemetry-proto` and `grpcio` packages (tests/peers/otlp_receiver.py).

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{otlp_peer::Receiver, *};
use plugin_api::{FrameKind, ProfileBatch};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn config(dir: &Path, batches: &[ProfileBatch], otlp: &str) -> PathBuf {
    let recording = write_recording(dir, batches);
    write_config(
        dir,
        &format!(
            "shutdown_timeout = \"20s\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n[consumers.otlp]\n{otlp}\n",
            recording.display()
        ),
    )
}

/// (pid, leaf-first function names) -> events, from the replayed batches.
fn replayed_stacks(batches: &[ProfileBatch]) -> BTreeMap<(i64, Vec<String>), usize> {
    let mut out = BTreeMap::new();
    for b in batches {
        for s in b.samples.iter() {
            let names = b
                .stack(s.stack)
                .map(|f| b.str(f.function).to_owned())
                .collect();
            *out.entry((i64::from(s.pid), names)).or_default() += s.values[0] as usize;
        }
    }
    out
}

/// The same, from what the receiver decoded.
fn received_stacks(requests: &[Value]) -> BTreeMap<(i64, Vec<String>), usize> {
    let mut out = BTreeMap::new();
    for r in requests {
        for res in r["resources"].as_array().unwrap() {
            let pid = res["resource"]["process.pid"].as_i64().unwrap();
            for s in res["samples"].as_array().unwrap() {
                let names = s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f["name"].as_str().unwrap().to_owned())
                    .collect();
                *out.entry((pid, names)).or_default() += s["timestamps"].as_array().unwrap().len();
            }
        }
    }
    out
}

fn check_against_replay(requests: &[Value], batches: &[ProfileBatch]) {
    assert!(!requests.is_empty());
    for r in requests {
        assert_eq!(r["errors"], serde_json::json!([]), "every index in range");
        for (table, ok) in r["placeholders"].as_object().unwrap() {
            assert_eq!(
                ok,
                &Value::Bool(true),
                "entry 0 of the {table} table is the empty placeholder"
            );
        }
    }
    assert_eq!(
        received_stacks(requests),
        replayed_stacks(batches),
        "stacks rebuilt leaf first, every event"
    );
    let (start, end) = (batches[0].start_ns, batches.last().unwrap().end_ns);
    for r in requests {
        for res in r["resources"].as_array().unwrap() {
            assert_eq!(res["sample_type"], serde_json::json!(["samples", "count"]));
            assert_eq!(
                res["period_type"],
                serde_json::json!(["cpu", "nanoseconds"])
            );
            assert_eq!(res["period"].as_i64().unwrap(), batches[0].period_ns as i64);
            assert_eq!(res["scope"]["name"], "profile-router");
            let resource = &res["resource"];
            let pid = resource["process.pid"].as_i64().unwrap();
            let app = format!("app{}", pid - 1000);
            assert_eq!(resource["process.executable.name"], app.as_str());
            assert_eq!(
                resource["process.executable.path"],
                format!("/usr/bin/{app}").as_str()
            );
            assert_eq!(resource["host.name"], "synthetic-host");
            assert_eq!(
                resource["service.name"],
                format!("unknown_service:{app}").as_str()
            );
            for s in res["samples"].as_array().unwrap() {
                for t in s["timestamps"].as_array().unwrap() {
                    let t = t.as_u64().unwrap();
                    assert!(start <= t && t <= end, "timestamp {t} inside the batches");
                }
                let a = &s["attributes"];
                assert_eq!(a["thread.name"], app.as_str());
                assert!(a["thread.id"].as_i64().unwrap() >= pid);
                assert!(a["cpu.logical_number"].as_i64().unwrap() < 2);
                for f in s["frames"].as_array().unwrap() {
                    let kernel = f["mapping_file"] == "[kernel.kallsyms]";
                    assert_eq!(f["type"], if kernel { "kernel" } else { "native" });
                    if !kernel {
                        assert_eq!(f["build_id"].as_str().unwrap().len(), 40);
                    }
                }
            }
        }
    }
}

#[test]
fn grpc_export_is_decoded_by_the_official_proto_package() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let batches = small_batches(3);
    let config = config(
        dir.path(),
        &batches,
        &format!("endpoint = \"http://127.0.0.1:{}\"", receiver.grpc_port),
    );
    let log = expect_success(run_with_limit(
        router()
            .arg("--config")
            .arg(&config)
            .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci"),
        LIMIT,
    ));
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3, "one request per batch by default: {log}");
    assert!(requests.iter().all(|r| r["transport"] == "grpc"));
    check_against_replay(&requests, &batches);
    let resource = &requests[0]["resources"][0]["resource"];
    assert_eq!(resource["deployment.environment"], "ci");
    let kernel_frames = batches[0]
        .frames
        .iter()
        .filter(|f| f.kind == FrameKind::Kernel)
        .count();
    assert!(kernel_frames > 0);
}

#[test]
fn http_protobuf_export_with_headers_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let batches = small_batches(2);
    let config = config(
        dir.path(),
        &batches,
        &format!("protocol = \"http/protobuf\"\nendpoint = \"http://127.0.0.1:{}\"\nexport_interval = \"20s\"", receiver.http_port),
    );
    let log = expect_success(run_with_limit(
        router()
            .arg("--config")
            .arg(&config)
            .env("OTEL_EXPORTER_OTLP_HEADERS", "x-scope-orgid=tenant-a"),
        LIMIT,
    ));
    assert!(
        !log.contains("tenant-a"),
        "header values stay out of the log: {log}"
    );
    let requests = receiver.requests();
    assert_eq!(
        requests.len(),
        1,
        "two 10 s batches in one 20 s export: {log}"
    );
    assert_eq!(requests[0]["transport"], "http");
    assert_eq!(requests[0]["headers"]["x-scope-orgid"], "tenant-a");
    assert_eq!(requests[0]["headers"]["content-encoding"], "gzip");
    check_against_replay(&requests, &batches);
}

#[test]
fn unavailable_then_ok_is_retried_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 2);
    let batches = small_batches(3);
    let config = config(
        dir.path(),
        &batches,
        &format!(
            "endpoint = \"http://127.0.0.1:{}\"\nretry_backoff = \"100ms\"",
            receiver.grpc_port
        ),
    );
    let log = expect_success(run_with_limit(router().arg("--config").arg(&config), LIMIT));
    assert!(
        log.contains("gRPC Unavailable: receiver warming up; retrying"),
        "{log}"
    );
    assert!(
        log.contains("exported=3 dropped=0 rejected=0 retries=2"),
        "{log}"
    );
    check_against_replay(&receiver.requests(), &batches);
}

#[test]
fn a_receiver_down_at_start_gets_what_the_queue_kept_and_drops_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc_port, http_port) = (free_port(), free_port());
    let batches = small_batches(6);
    let config = config(
        dir.path(),
        &batches,
        &format!("endpoint = \"http://127.0.0.1:{grpc_port}\"\nmax_queue = 2\nretry_backoff = \"200ms\"\nretry_max_backoff = \"500ms\""),
    );
    let child = spawn_router(&config, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let receiver = Receiver::start_on(dir.path(), grpc_port, http_port, 0);
    let out = wait_with_limit(child, LIMIT);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("exported=3 dropped=3"), "{log}");
    // Request 1 was in flight; of 2..=6 the queue kept the newest two.
    let kept = [&batches[0], &batches[4], &batches[5]].map(Clone::clone);
    check_against_replay(&receiver.requests(), &kept);
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, made with openssl:
/// returns (CA certificate, server chain, server key).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = r#"set -e
        ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
        openssl req -x509 $ec -days 2 -subj "/CN=test CA" -keyout ca.key -out ca.pem
        openssl req $ec -subj /CN=127.0.0.1 -keyout server.key -out server.csr
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile server.ext -out server.pem"#;
    let out = run_with_limit(
        std::process::Command::new("sh")
            .args(["-c", script])
            .current_dir(dir),
        LIMIT,
    );
    assert!(out.status.success(), "openssl: {}", text(&out));
    let file = |name: &str| dir.join(name);
    (file("ca.pem"), file("server.pem"), file("server.key"))
}

#[test]
fn https_with_a_private_ca_over_grpc_and_http_and_refused_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, chain, key) = private_ca(dir.path());
    let receiver = Receiver::start_tls(dir.path(), &chain, &key);
    let batches = small_batches(1);
    let ca = ca.display();
    for (protocol, port) in [
        ("grpc", receiver.grpc_port),
        ("http/protobuf", receiver.http_port),
    ] {
        let config = config(
            dir.path(),
            &batches,
            &format!("protocol = \"{protocol}\"\nendpoint = \"https://127.0.0.1:{port}\"\nca_file = \"{ca}\""),
        );
        let log = expect_success(run_with_limit(router().arg("--config").arg(&config), LIMIT));
        assert!(
            log.contains("exported=1 dropped=0 rejected=0 retries=0"),
            "{protocol}: {log}"
        );
    }
    let requests = receiver.requests();
    assert_eq!(
        requests
            .iter()
            .map(|r| r["transport"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["grpc", "http"]
    );
    for request in &requests {
        check_against_replay(std::slice::from_ref(request), &batches);
    }

    // Without the CA the server's certificate is not trusted: nothing is sent, and the log says why.
    let recording = write_recording(dir.path(), &batches);
    let untrusted = write_config(
        dir.path(),
        &format!(
            "shutdown_timeout = \"3s\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n[consumers.otlp]\nprotocol = \"http/protobuf\"\nendpoint = \"https://127.0.0.1:{}\"\nretry_backoff = \"200ms\"\n",
            recording.display(),
            receiver.http_port
        ),
    );
    let out = run_with_limit(router().arg("--config").arg(&untrusted), LIMIT);
    let log = text(&out);
    assert!(log.contains("invalid peer certificate"), "{log}");
    assert_eq!(receiver.requests().len(), 2);
}

#[test]
fn a_ca_file_that_is_missing_or_not_a_certificate_is_named_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let batches = small_batches(1);
    let not_pem = dir.path().join("notes.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    for (file, reason) in [
        (
            dir.path().join("missing.pem"),
            "No such file or directory".to_string(),
        ),
        (not_pem, "no PEM certificate".to_string()),
    ] {
        let config = config(
            dir.path(),
            &batches,
            &format!(
                "endpoint = \"https://127.0.0.1:9\"\nca_file = \"{}\"",
                file.display()
            ),
        );
        let out = run_with_limit(router().arg("--config").arg(&config), LIMIT);
        let log = text(&out);
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains(&format!("ca_file \"{}\"", file.display())),
            "{log}"
        );
        assert!(log.contains(&reason), "{log}");
    }
}
