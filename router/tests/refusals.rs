//! Every refusal names the thing that is wrong, the value and where it came from.

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// `router --check` with `[consumers.probe]` pointing at `plugin` plus `extra` keys.
fn check_plugin(dir: &Path, plugin: &Path, extra: &str) -> (bool, String) {
    let config = write_config(
        dir,
        &format!(
            "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n[consumers.probe]\nplugin = \"{}\"\n{extra}\n",
            write_recording(dir, &small_batches(1)).display(),
            plugin.display()
        ),
    );
    let out = run_with_limit(router().arg("--check").arg("--config").arg(config), LIMIT);
    (out.status.success(), text(&out))
}

#[test]
fn check_accepts_a_good_plugin_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let (ok, log) = check_plugin(
        dir.path(),
        &plugin("test_consumer"),
        &format!("output = \"{}\"", output.display()),
    );
    assert!(ok, "{log}");
    assert!(log.contains("ok: consumer probe"), "{log}");
    assert!(log.contains("test-consumer 0.1.0, contract v2"), "{log}");
}

#[test]
fn missing_plugin_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnothing.so");
    let (ok, log) = check_plugin(dir.path(), &missing, "");
    assert!(!ok);
    assert!(
        log.contains(&format!(
            "consumer probe: plugin file {} not found",
            missing.display()
        )),
        "{log}"
    );
}

#[test]
fn relative_plugin_paths_resolve_against_plugin_dir() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "plugin_dir = \"{}\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n[consumers.probe]\nplugin = \"libtest_consumer.so\"\noutput = \"/dev/null\"\n",
            plugin_dir().display(),
            write_recording(dir.path(), &small_batches(1)).display(),
        ),
    );
    let out = run_with_limit(router().arg("--check").arg("--config").arg(config), LIMIT);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_file_that_is_not_a_shared_library() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, "not an ELF file").unwrap();
    let (ok, log) = check_plugin(dir.path(), &fake, "");
    assert!(!ok);
    assert!(
        log.contains(&format!(
            "{} is not a usable consumer plugin: cannot open it as a shared library",
            fake.display()
        )),
        "{log}"
    );
}

#[test]
fn a_shared_library_that_is_not_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, log) = check_plugin(
        dir.path(),
        &plugin("test_consumer").with_file_name("librouter_not_here.so"),
        "",
    );
    assert!(!ok, "{log}");
    // A real shared library without our root module: the C math library.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libm on this machine");
    let (ok, log) = check_plugin(dir.path(), Path::new(libm), "");
    assert!(!ok);
    assert!(
        log.contains("exports no consumer plugin root module"),
        "{log}"
    );
}

#[test]
fn a_plugin_built_against_contract_v1_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = plugin("other_contract_consumer");
    let (ok, log) = check_plugin(dir.path(), &path, "");
    assert!(!ok);
    assert!(
        log.contains(&format!(
            "plugin {} was built against plugin contract v1, but this router speaks contract v2",
            path.display()
        )),
        "{log}"
    );
}

#[test]
fn a_plugin_that_rejects_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, log) = check_plugin(
        dir.path(),
        &plugin("test_consumer"),
        "output = \"/dev/null\"\nbogus_key = 3",
    );
    assert!(!ok);
    assert!(log.contains("consumer probe: plugin"), "{log}");
    assert!(
        log.contains("rejected its configuration: test-consumer:"),
        "{log}"
    );
    assert!(log.contains("unknown field `bogus_key`"), "{log}");
}

#[test]
fn a_world_writable_plugin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libcopy.so");
    std::fs::copy(plugin("test_consumer"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, log) = check_plugin(dir.path(), &copy, "output = \"/dev/null\"");
    assert!(!ok);
    assert!(
        log.contains(&format!(
            "refusing plugin {}: it is writable by every user (mode 666)",
            copy.display()
        )),
        "{log}"
    );
}

#[test]
fn unknown_key_in_the_file_is_named_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[producer]\nfrequency = 99\n");
    let out = run_with_limit(router().arg("--check").arg("--config").arg(&config), LIMIT);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("unknown field: found `frequency`"), "{log}");
    assert!(log.contains(&config.display().to_string()), "{log}");
}

#[test]
fn unknown_key_in_the_environment_is_named_with_the_variable() {
    let out = run_with_limit(
        router().arg("--check").env("ROUTER_PRODUCER__SPEED", "3"),
        LIMIT,
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("`speed`"), "{log}");
    assert!(log.contains("ROUTER_PRODUCER__SPEED"), "{log}");
    assert!(log.contains("environment variable"), "{log}");
}

#[test]
fn a_bad_duration_names_the_key_the_value_and_the_flag() {
    let out = run_with_limit(
        router().args(["--check", "--profiling-interval", "sixty"]),
        LIMIT,
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(
        log.contains("expected a duration like \"10s\", got \"sixty\""),
        "{log}"
    );
    assert!(log.contains("--producer.interval"), "{log}");
    assert!(log.contains("command-line flags"), "{log}");
}

#[test]
fn seed_flags_map_onto_config_keys_and_print_config_redacts_secrets() {
    let out = run_with_limit(
        router()
            .args([
                "--print-config",
                "--enable-profiling-perfdata",
                "--profiling-perfdata-path=/tmp/p",
            ])
            .args([
                "--enable-profiling-datadog",
                "--profiling-datadog-service=web",
                "--profiling-interval=5s",
            ])
            .env("ROUTER_CONSUMERS__DATADOG__API_KEY", "0123456789abcdef"),
        LIMIT,
    );
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    let config: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(config["producer"]["interval"].as_str(), Some("5s"));
    assert_eq!(
        config["consumers"]["perfdata"]["path"].as_str(),
        Some("/tmp/p")
    );
    assert_eq!(
        config["consumers"]["datadog"]["service"].as_str(),
        Some("web")
    );
    assert_eq!(
        config["consumers"]["datadog"]["api_key"].as_str(),
        Some("<redacted>")
    );
    assert!(!printed.contains("0123456789abcdef"));
}
