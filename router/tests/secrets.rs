//! Credentials never leave the agent in what it shows: passwords in URLs (`agent_url`,
//! `endpoint`) are redacted in the log, in `--print-config` and in `--check`, and the value
//! of a secret key is never echoed in an error, even when it has the wrong type.

mod common;

use std::{path::Path, time::Duration};

use common::{otlp_peer::Receiver, *};

const LIMIT: Duration = Duration::from_secs(60);

/// The passwords the configurations below carry; none may appear in any output.
const SECRETS: [&str; 4] = ["dd-hunter2", "otlp-hunter3", "key-hunter4", "hdr-hunter5"];

fn assert_no_secret(output: &str) {
    for secret in SECRETS {
        assert!(!output.contains(secret), "{secret} shown in:\n{output}");
    }
}

/// Replays one batch into Datadog at `datadog_port` and OTLP (gRPC) at `otlp_port`, both
/// reached through URLs with a user and a password.
fn config_with_credentials(dir: &Path, datadog_port: u16, otlp_port: u16) -> std::path::PathBuf {
    let recording = write_recording(dir, &small_batches(1));
    write_config(
        dir,
        &format!(
            "shutdown_timeout = \"20s\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n\
             [consumers.datadog]\n\
             agent_url = \"http://dd:dd-hunter2@127.0.0.1:{datadog_port}/profiling/v1/input\"\n\
             [consumers.otlp]\nendpoint = \"http://otlp:otlp-hunter3@127.0.0.1:{otlp_port}\"\n\
             headers = {{ X-Scope-OrgID = \"hdr-hunter5\" }}\n",
            recording.display()
        ),
    )
}

#[test]
fn passwords_in_urls_are_used_but_never_logged_or_printed() {
    let dir = tempfile::tempdir().unwrap();
    let agent = ScriptedServer::start(vec![Reply::Status(200, "ok")]);
    let receiver = Receiver::start(dir.path(), 0);
    let config = config_with_credentials(dir.path(), agent.port, receiver.grpc_port);

    let log = expect_success(run_with_limit(router().arg("--config").arg(&config), LIMIT));
    assert_no_secret(&log);
    assert!(log.contains("http://dd:***@127.0.0.1"), "{log}");
    assert!(log.contains("http://otlp:***@127.0.0.1"), "{log}");
    // Delivered all the same, with the credentials.
    let uploads = agent.requests();
    assert_eq!(uploads.len(), 1, "{log}");
    assert!(uploads[0].header("authorization").is_some(), "{log}");
    assert_eq!(receiver.requests().len(), 1, "{log}");

    for flag in ["--print-config", "--check"] {
        let out = run_with_limit(router().arg("--config").arg(&config).arg(flag), LIMIT);
        let shown = text(&out);
        assert!(out.status.success(), "{flag}: {shown}");
        assert_no_secret(&shown);
    }
    let printed = text(&run_with_limit(
        router().arg("--config").arg(&config).arg("--print-config"),
        LIMIT,
    ));
    assert!(printed.contains("http://dd:***@127.0.0.1"), "{printed}");
}

#[test]
fn secrets_are_not_echoed_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (table, named) in [
        // A secret of the wrong type: the error names the key, not the value.
        (
            "[consumers.otlp]\nheaders = \"Authorization=Bearer hdr-hunter5\"\n",
            "headers",
        ),
        (
            "[consumers.datadog]\napi_key = [\"key-hunter4\"]\n",
            "api_key",
        ),
        // A URL the consumer refuses: shown with its password redacted.
        (
            "[consumers.otlp]\nendpoint = \"grpc://otlp:otlp-hunter3@127.0.0.1:4317\"\n",
            "grpc://otlp:***@127.0.0.1:4317",
        ),
        (
            "[consumers.datadog]\nagent_url = \"http://dd:dd-hunter2@[::1/x\"\n",
            "http://dd:***@[::1/x",
        ),
    ] {
        let config = write_config(dir.path(), table);
        let out = run_with_limit(router().arg("--config").arg(&config).arg("--check"), LIMIT);
        let shown = text(&out);
        assert!(!out.status.success(), "{table}: {shown}");
        assert!(shown.contains(named), "{table}: {shown}");
        assert_no_secret(&shown);
    }
}
