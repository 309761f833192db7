//! The deployment files are valid for the tools that will read them.

mod common;

use std::{path::Path, process::Command};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    // The unit names the installed binary; verify it against the one this build made.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/router.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/router --config /etc/profile-router/agent.toml")
    );
    assert!(
        unit.contains("AmbientCapabilities=CAP_BPF CAP_PERFMON"),
        "capabilities, not full root"
    );
    assert!(unit.contains("Restart=on-failure"));
    let local = unit.replace(
        "/usr/local/bin/router",
        &common::router_bin().display().to_string(),
    );
    let path = dir.path().join("router.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = common::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("router.service:"),
        "no complaint about the unit: {text}"
    );
}

#[test]
fn the_daemonset_is_valid_kubernetes_for_the_schema_validator() {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(repo().join("deploy/kubernetes/daemonset.yaml"))
        .output()
        .expect("python3 with kubernetes-validate (scripts/setup.sh --test)");
    let text = common::text(&out);
    assert!(out.status.success(), "{text}");
    for resource in [
        "namespace/profile-router",
        "configmap/profile-router-config",
        "daemonset/profile-router",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource}")),
            "{text}"
        );
    }
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    assert!(yaml.contains("hostPID: true"));
    assert!(
        yaml.contains("fieldPath: status.hostIP"),
        "DD_AGENT_HOST from the node IP"
    );
    assert!(
        yaml.contains("- name: NODE_NAME") && yaml.contains("fieldPath: spec.nodeName"),
        "the node's name, not the pod's"
    );
    assert!(
        yaml.contains("fieldPath: status.podIP")
            && yaml.contains(
                "- name: ROUTER_TELEMETRY__LISTEN\n              value: \"$(POD_IP):9464\""
            ),
        "telemetry on the pod's IP"
    );
    assert!(
        !yaml.contains("0.0.0.0:"),
        "telemetry on no wildcard address"
    );
    for setting in [
        "tolerations:",
        "kubernetes.io/os: linux",
        "priorityClassName: system-node-critical",
        "type: Unconfined",
        "container.apparmor.security.beta.kubernetes.io/router: unconfined",
    ] {
        assert!(yaml.contains(setting), "{setting}");
    }
}

#[test]
fn the_configmaps_agent_toml_is_accepted_by_the_router() {
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let start = yaml.find("agent.toml: |\n").unwrap() + "agent.toml: |\n".len();
    let toml: String = yaml[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.trim_start_matches("    ")))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &toml);
    // The listen address as the kubelet expands it for a pod whose IP is 10.1.2.3.
    let listen = yaml
        .split_once("- name: ROUTER_TELEMETRY__LISTEN\n              value: ")
        .and_then(|(_, rest)| rest.lines().next())
        .expect("ROUTER_TELEMETRY__LISTEN in the DaemonSet")
        .trim_matches('"')
        .replace("$(POD_IP)", "10.1.2.3");
    let out = common::run_with_limit(
        common::router()
            .env("ROUTER_TELEMETRY__LISTEN", &listen)
            .arg("--print-config")
            .arg("--config")
            .arg(config),
        std::time::Duration::from_secs(30),
    );
    let text = common::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[telemetry]\nlisten = \"10.1.2.3:9464\""),
        "{listen}: {text}"
    );
}
