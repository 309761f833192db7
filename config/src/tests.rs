use std::io::Write;

use super::*;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

/// An environment layer read from variables with a prefix unique to the test.
fn env(prefix: &'static str, vars: &[(&str, &str)]) -> EnvLayer {
    for (k, v) in vars {
        std::env::set_var(format!("{prefix}{k}"), v);
    }
    EnvLayer::new(prefix)
}

fn load_err(file_text: Option<&str>, prefix: &'static str, vars: &[(&str, &str)]) -> String {
    let f = file_text.map(file);
    match load_with_env(
        f.as_ref().map(|f| f.path()),
        FlagOverrides::default(),
        env(prefix, vars),
    ) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_profile_the_host_into_perfdata() {
    let loaded = load_with_env(None, FlagOverrides::default(), env("T_DEF_", &[])).unwrap();
    let c = &loaded.config;
    assert_eq!(c.producer.kind, ProducerKind::Ebpf);
    assert_eq!(c.producer.frequency_hz, 99);
    assert_eq!(c.producer.interval.0.as_secs(), 10);
    assert_eq!(c.queue_capacity, 100);
    assert_eq!(c.consumers.keys().collect::<Vec<_>>(), ["perfdata"]);
    assert_eq!(
        c.consumers["perfdata"].plugin_file("perfdata").unwrap(),
        PathBuf::from("libconsumer_perfdata.so")
    );
}

#[test]
fn layers_apply_in_order_file_env_flags() {
    let f = file(
        "[producer]\nfrequency_hz = 49\ninterval = \"5s\"\n[consumers.datadog]\nservice = \"from-file\"\nenv = \"prod\"\n",
    );
    let mut flags = FlagOverrides::default();
    flags.set("consumers.datadog.service", "from-flag");
    let loaded = load_with_env(
        Some(f.path()),
        flags,
        env(
            "T_LAYER_",
            &[
                ("PRODUCER__FREQUENCY_HZ", "19"),
                ("CONSUMERS__DATADOG__ENV", "staging"),
            ],
        ),
    )
    .unwrap();
    let c = &loaded.config;
    assert_eq!(c.producer.frequency_hz, 19);
    assert_eq!(c.producer.interval.0.as_secs(), 5);
    let dd = &c.consumers["datadog"];
    assert_eq!(dd.settings["service"].as_str(), Some("from-flag"));
    assert_eq!(dd.settings["env"].as_str(), Some("staging"));
    assert!(
        !c.consumers.contains_key("perfdata"),
        "explicit consumers replace the default"
    );
    assert!(loaded
        .source_of("producer.frequency_hz")
        .contains("T_LAYER_PRODUCER__FREQUENCY_HZ"));
    assert!(loaded
        .source_of("producer.interval")
        .contains(&f.path().display().to_string()));
    assert!(loaded
        .source_of("consumers.datadog.service")
        .contains("command-line flags"));
}

#[test]
fn unknown_key_in_file_names_key_and_file() {
    let msg = load_err(Some("[producer]\nfrequncy_hz = 99\n"), "T_UNK1_", &[]);
    assert!(msg.contains("frequncy_hz"), "{msg}");
    assert!(msg.contains("producer"), "{msg}");
    assert!(msg.contains(".toml"), "{msg}");
}

#[test]
fn unknown_key_in_env_names_the_variable() {
    let msg = load_err(None, "T_UNK2_", &[("PRODUCR__KIND", "ebpf")]);
    assert!(msg.contains("producr"), "{msg}");
    assert!(
        msg.contains("environment variable T_UNK2_PRODUCR")
            || msg.contains("\"T_UNK2_PRODUCR\" in environment variable"),
        "{msg}"
    );
}

#[test]
fn bad_duration_names_key_value_and_source() {
    let msg = load_err(Some("[producer]\ninterval = \"sixty\"\n"), "T_DUR_", &[]);
    assert!(
        msg.contains("expected a duration like \"10s\", got \"sixty\""),
        "{msg}"
    );
    assert!(msg.contains("producer.interval"), "{msg}");
    assert!(msg.contains(".toml"), "{msg}");
}

#[test]
fn wrong_type_names_key_and_value() {
    let msg = load_err(None, "T_TYPE_", &[("PRODUCER__FREQUENCY_HZ", "fast")]);
    assert!(msg.contains("T_TYPE_PRODUCER__FREQUENCY_HZ"), "{msg}");
    assert!(msg.contains("\"fast\""), "{msg}");
}

#[test]
fn out_of_range_value_names_key_value_and_source() {
    let msg = load_err(Some("[producer]\nfrequency_hz = 20000\n"), "T_RANGE_", &[]);
    assert!(msg.contains("producer.frequency_hz = 20000"), "{msg}");
    assert!(msg.contains("1 to 10000"), "{msg}");
    assert!(msg.contains(".toml"), "{msg}");
}

#[test]
fn third_party_consumer_needs_a_plugin_path() {
    let msg = load_err(Some("[consumers.mine]\nfoo = 1\n"), "T_TP_", &[]);
    assert!(msg.contains("consumers.mine.plugin"), "{msg}");
}

#[test]
fn missing_file_is_named() {
    let err = load_with_env(
        Some(Path::new("/nonexistent/agent.toml")),
        FlagOverrides::default(),
        env("T_MISSING_", &[]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}

/// The error of loading the configuration from `path`.
fn load_path_err(path: &Path, prefix: &'static str) -> String {
    load_with_env(Some(path), FlagOverrides::default(), env(prefix, &[]))
        .err()
        .expect("expected an error")
        .to_string()
}

#[test]
fn a_device_as_the_config_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("agent.toml");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let msg = load_path_err(&link, "T_DEVZERO_");
    assert_eq!(
        msg,
        format!(
            "config file {}: a character device, not a regular file: refused",
            link.display()
        )
    );
}

#[test]
fn a_fifo_as_the_config_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("agent.toml");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // No writer ever opens it: a blocking open would wait for good.
    let msg = load_path_err(&fifo, "T_FIFO_");
    assert!(msg.contains(&fifo.display().to_string()), "{msg}");
    assert!(msg.contains("a FIFO, not a regular file"), "{msg}");
}

#[test]
fn a_config_file_over_the_limit_is_refused_naming_its_size_and_the_limit() {
    let big = file(&format!(
        "# {}\n",
        "x".repeat(MAX_CONFIG_FILE_BYTES as usize)
    ));
    let msg = load_path_err(big.path(), "T_BIG_");
    let size = MAX_CONFIG_FILE_BYTES + 3;
    assert_eq!(
        msg,
        format!(
            "config file {}: {size} bytes, more than the limit of 1048576 bytes: refused",
            big.path().display()
        )
    );
    // At the limit it loads.
    let at_limit = format!("# {}\n", "x".repeat(MAX_CONFIG_FILE_BYTES as usize - 3));
    let at_limit = file(&at_limit);
    load_with_env(
        Some(at_limit.path()),
        FlagOverrides::default(),
        env("T_ATLIMIT_", &[]),
    )
    .unwrap();
}

#[test]
fn print_config_redacts_secrets() {
    let f = file("[consumers.datadog]\napi_key = \"abcdef0123456789\"\nservice = \"web\"\n");
    let loaded =
        load_with_env(Some(f.path()), FlagOverrides::default(), env("T_RED_", &[])).unwrap();
    let text = loaded.to_redacted_toml();
    assert!(!text.contains("abcdef0123456789"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(text.contains("service = \"web\""), "{text}");
}

#[test]
fn plugin_settings_are_handed_over_as_toml() {
    let f =
        file("[consumers.perfdata]\npath = \"/tmp/x\"\nqueue_capacity = 7\nflamegraph = false\n");
    let loaded =
        load_with_env(Some(f.path()), FlagOverrides::default(), env("T_SET_", &[])).unwrap();
    let entry = &loaded.config.consumers["perfdata"];
    assert_eq!(entry.queue_capacity, Some(7));
    let settings: toml::Table = toml::from_str(&entry.settings_toml()).unwrap();
    assert_eq!(settings["path"].as_str(), Some("/tmp/x"));
    assert_eq!(settings["flamegraph"].as_bool(), Some(false));
    assert!(!settings.contains_key("queue_capacity"));
}

#[test]
fn durations_and_sizes_out_of_range_are_refused_naming_key_value_and_source() {
    let huge = "\"18446744073709551615s\"";
    for (text, key) in [
        (
            format!("[producer]\ninterval = {huge}\n"),
            "producer.interval",
        ),
        (format!("shutdown_timeout = {huge}\n"), "shutdown_timeout"),
        ("queue_capacity = 1000000000\n".into(), "queue_capacity"),
        (
            "[consumers.perfdata]\nqueue_capacity = 1000000000\n".into(),
            "consumers.perfdata.queue_capacity",
        ),
        (
            "[producer.replay]\nspeed = 1e-300\n".into(),
            "producer.replay.speed",
        ),
        (
            "[producer.replay]\nspeed = nan\n".into(),
            "producer.replay.speed",
        ),
    ] {
        let error = load_err(Some(&text), "T_RANGE_", &[]);
        assert!(error.contains(key), "{text}: {error}");
        assert!(error.contains("TOML file"), "{text}: {error}");
    }
}

#[test]
fn a_log_filter_that_is_not_one_is_refused() {
    for level in ["loud", "router=loud", "info,warning", "=debug["] {
        let error = load_err(Some(&format!("log_level = {level:?}\n")), "T_LOG_", &[]);
        assert!(error.contains("log_level"), "{level}: {error}");
    }
    for level in [
        "info",
        "router=debug,warn",
        "off",
        "TRACE",
        "router::bus=trace",
    ] {
        let f = file(&format!("log_level = {level:?}\n"));
        load_with_env(
            Some(f.path()),
            FlagOverrides::default(),
            env("T_LOG_OK_", &[]),
        )
        .unwrap_or_else(|e| panic!("{level}: {e}"));
    }
}

#[test]
fn replay_plays_once_by_default_and_refuses_zero_times() {
    let loaded = load_with_env(None, FlagOverrides::default(), env("T_REP_", &[])).unwrap();
    assert_eq!(loaded.config.producer.replay.repeat, 1);
    assert!(loaded.to_redacted_toml().contains("repeat = 1"));
    let error = load_err(Some("[producer.replay]\nrepeat = 0\n"), "T_REP0_", &[]);
    assert!(error.contains("producer.replay.repeat = 0"), "{error}");
}

#[test]
fn print_config_hides_url_passwords_and_secret_values() {
    let f = file(
        "[consumers.datadog]\nagent_url = \"http://dd:hunter2@127.0.0.1:8126\"\napi_key = \"k3y\"\n\
         [consumers.otlp]\nendpoint = \"http://t0ken@127.0.0.1:4317\"\n\
         headers = { Authorization = \"Bearer b3arer\" }\n",
    );
    let loaded =
        load_with_env(Some(f.path()), FlagOverrides::default(), env("T_RED_", &[])).unwrap();
    let shown = loaded.to_redacted_toml();
    for secret in ["hunter2", "k3y", "t0ken", "b3arer"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("http://dd:***@127.0.0.1:8126"), "{shown}");
    assert!(shown.contains("http://***@127.0.0.1:4317"), "{shown}");
}

#[test]
fn an_error_about_a_secret_key_does_not_show_its_value() {
    let error = load_err(Some("api_key = \"hunter2\"\n"), "T_SECRET_", &[]);
    assert!(error.contains("api_key"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
}

#[test]
fn a_wrong_typed_url_is_shown_without_its_password() {
    let error = load_err(
        Some("[consumers.perfdata]\nenabled = \"http://u:hunter2@host/x\"\n"),
        "T_URLTYPE_",
        &[],
    );
    assert!(error.contains("consumers.perfdata.enabled"), "{error}");
    assert!(error.contains("http://u:***@host/x"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
}
