//! docs/configuration.md lists exactly the keys the code accepts, table by table: the keys are
//! read from the code's own "unknown field" errors (serde's list of expected fields).

mod common;

use std::{collections::BTreeMap, path::Path, time::Duration};

use common::*;

/// Keys per section heading (`## \`[producer]\``), from the doc's tables.
fn documented() -> BTreeMap<String, Vec<String>> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .unwrap();
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("## `") {
            current = Some(heading.trim_end_matches('`').to_owned());
        } else if let (Some(section), Some(row)) = (&current, line.strip_prefix("| `")) {
            let key = row.split('`').next().unwrap().to_owned();
            sections.entry(section.clone()).or_default().push(key);
        }
    }
    sections.values_mut().for_each(|keys| keys.sort());
    sections
}

/// The fields an "unknown field" error says were expected.
fn expected_fields(message: &str) -> Vec<String> {
    let after = message
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no field list in: {message}"));
    let line = after.lines().next().unwrap();
    let list = line
        .split(" for key")
        .next()
        .unwrap()
        .split(" (in ")
        .next()
        .unwrap();
    // The names are the quoted parts, with no space in them ("expected ``a` or `b``",
    // "expected `one of `a`, `b``"): " or " and ", " are not names.
    let mut keys: Vec<String> = list
        .split('`')
        .filter(|k| k.starts_with(|c: char| c.is_ascii_alphabetic()))
        .filter(|k| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// What `router --check` says about `config` (a replay producer, so that no eBPF is needed).
fn check_output(dir: &Path, config: &str) -> String {
    let recording = write_recording(dir, &small_batches(1));
    let path = write_config(dir, &format!("{config}\n"));
    let written = std::fs::read_to_string(&path).unwrap();
    let with_producer = if written.contains("[producer") {
        written
    } else {
        format!(
            "{written}\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n",
            recording.display()
        )
    };
    std::fs::write(&path, with_producer).unwrap();
    let out = run_with_limit(
        router().arg("--check").arg("--config").arg(&path),
        Duration::from_secs(30),
    );
    text(&out)
}

#[test]
fn every_key_in_the_code_is_documented_and_every_documented_key_exists() {
    let dir = tempfile::tempdir().unwrap();
    let recording = write_recording(dir.path(), &small_batches(1));
    let docs = documented();
    let mut code: BTreeMap<String, Vec<String>> = BTreeMap::new();

    let root = check_output(dir.path(), "zz_not_a_key = 1");
    code.insert("(top level)".into(), expected_fields(&root));
    for table in ["producer", "telemetry"] {
        let out = check_output(dir.path(), &format!("[{table}]\nzz_not_a_key = 1"));
        code.insert(format!("[{table}]"), expected_fields(&out));
    }
    let replay = check_output(dir.path(), "[producer.replay]\nzz_not_a_key = 1");
    code.insert("[producer.replay]".into(), expected_fields(&replay));
    let services = check_output(dir.path(), "[producer.services]\nzz_not_a_key = 1");
    code.insert("[producer.services]".into(), expected_fields(&services));
    let rule = check_output(
        dir.path(),
        "[[producer.services.rules]]\nservice = \"s\"\nzz_not_a_key = 1",
    );
    code.insert("[[producer.services.rules]]".into(), expected_fields(&rule));
    for plugin in ["perfdata", "datadog", "otlp"] {
        let out = check_output(
            dir.path(),
            &format!("[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n[consumers.{plugin}]\nzz_not_a_key = 1", recording.display()),
        );
        code.insert(format!("[consumers.{plugin}]"), expected_fields(&out));
    }
    // The router's own keys of a consumer table, as --print-config shows them.
    let config = write_config(
        dir.path(),
        "[consumers.x]\nplugin = \"/p.so\"\nqueue_capacity = 3\n",
    );
    let printed = run_with_limit(
        router().arg("--print-config").arg("--config").arg(config),
        Duration::from_secs(30),
    );
    let table: toml::Table = toml::from_str(&String::from_utf8_lossy(&printed.stdout)).unwrap();
    let mut entry_keys: Vec<String> = table["consumers"]["x"]
        .as_table()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    entry_keys.sort();
    code.insert("[consumers.NAME]".into(), entry_keys);

    assert_eq!(
        docs, code,
        "docs/configuration.md (left) and the code (right) disagree"
    );
}
