//! Properties of the configuration loader: a file that sets any of the real keys (found from
//! the schema itself) to any TOML value gives an error or a valid configuration, never a
//! panic; and a valid configuration's `--print-config` text loads back to the same one.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use proptest::{
    collection::{btree_map, vec},
    prelude::*,
    sample::select,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};
use router_config::{load, ConsumerEntry, FlagOverrides, LoadedConfig, RouterConfig};
use toml::{Table, Value};

/// Loads `table` written as a TOML file in `dir`.
fn load_table(dir: &Path, table: &Table) -> Result<LoadedConfig, String> {
    load_text(dir, &toml::to_string(table).expect("a TOML table prints"))
}

fn load_text(dir: &Path, text: &str) -> Result<LoadedConfig, String> {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    load(Some(&path), FlagOverrides::default()).map_err(|e| e.to_string())
}

/// Sets the dotted `path` in `table`, making (or replacing with) tables on the way.
fn set(table: &mut Table, path: &str, value: Value) {
    let (parents, leaf) = path.rsplit_once('.').unwrap_or(("", path));
    let mut at = table;
    for part in parents.split('.').filter(|p| !p.is_empty()) {
        let entry = at.entry(part).or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        at = entry.as_table_mut().unwrap();
    }
    at.insert(leaf.to_owned(), value);
}

/// The fields a table of the schema accepts, from the loader's own "unknown field" error for
/// a key that no table has.
fn fields_of(dir: &Path, section: &str, wrap: impl Fn(Value) -> Value) -> Vec<String> {
    let mut probe = Table::new();
    let mut unknown = Table::new();
    unknown.insert("__unknown_key".into(), Value::Integer(1));
    set(&mut probe, section, wrap(Value::Table(unknown)));
    let message = match load_table(dir, &probe) {
        Ok(_) => panic!("{section}.__unknown_key was accepted"),
        Err(e) => e,
    };
    let expected = message
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no field list in: {message}"));
    expected
        .lines()
        .next()
        .unwrap()
        .split(" for key")
        .next()
        .unwrap()
        .split('`')
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_owned)
        .collect()
}

/// Every key path of the schema: each table's fields (the tables found in the defaults),
/// the fields of a service rule, and a consumer's own keys under the built-in and a custom
/// consumer's name, beside keys of the plugins' own.
fn key_paths(dir: &Path) -> Vec<String> {
    let defaults = Value::try_from(RouterConfig::default()).unwrap();
    let mut sections = vec![String::new()];
    let mut paths = BTreeSet::new();
    while let Some(section) = sections.pop() {
        for field in fields_of(dir, &section, |v| v) {
            let path = if section.is_empty() {
                field
            } else {
                format!("{section}.{field}")
            };
            let default = path.split('.').try_fold(&defaults, |v, part| v.get(part));
            // `consumers` is a map by name, not a table of fields: below.
            if default.is_some_and(Value::is_table) && path != "consumers" {
                sections.push(path.clone());
            }
            paths.insert(path);
        }
    }
    let rules = "producer.services.rules";
    assert!(paths.contains(rules), "{paths:?}");
    for field in fields_of(dir, rules, |rule| Value::Array(vec![rule])) {
        paths.insert(format!("{rules}.{field}"));
    }
    let entry = Value::try_from(ConsumerEntry {
        plugin: Some("libx.so".into()),
        enabled: true,
        queue_capacity: Some(1),
        settings: Table::new(),
    })
    .unwrap();
    let mut consumer_keys: Vec<String> = entry.as_table().unwrap().keys().cloned().collect();
    consumer_keys.extend(
        [
            "path",
            "service",
            "agent_url",
            "endpoint",
            "headers",
            "api_key",
            "x",
        ]
        .map(String::from),
    );
    for name in ["datadog", "otlp", "perfdata", "custom"] {
        for key in &consumer_keys {
            paths.insert(format!("consumers.{name}.{key}"));
        }
    }
    paths.into_iter().collect()
}

/// A secret: the password of a URL, the value of a secret key. Never shown, neither in the
/// printed configuration nor in an error.
const SECRET: &str = "hunter2";

/// Values the schema's keys take, and their near misses.
const PLAUSIBLE_STRINGS: &[&str] = &[
    "",
    "10s",
    "100ms",
    "99ms",
    "1h",
    "0s",
    "18446744073709551615s",
    "1MiB",
    "32MiB",
    "4GiB",
    "5GiB",
    "18446744073709551615",
    "cpu-clock",
    "cpu-cycles",
    "replay",
    "ebpf",
    "dwarf",
    "frame-pointer",
    "human",
    "json",
    "info",
    "router=debug,warn",
    "inf",
    "127.0.0.1:9464",
    "[::1]:0",
    "/tmp/agent-plugins",
    "libconsumer_perfdata.so",
    "Authorization=Bearer x\ny",
    "(unclosed",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop_oneof![
            any::<String>(),
            select(PLAUSIBLE_STRINGS).prop_map(String::from)
        ]
        .prop_map(Value::String),
        prop_oneof![
            any::<i64>(),
            select(vec![
                0,
                1,
                -1,
                99,
                127,
                128,
                10_000,
                100_000,
                100_001,
                i64::MAX,
                i64::MIN
            ]),
        ]
        .prop_map(Value::Integer),
        prop_oneof![
            any::<f64>(),
            select(vec![
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                0.0,
                -0.0,
                0.001,
                1000.5,
                1e300
            ]),
        ]
        .prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        Just(Value::String(format!(
            "http://user:{SECRET}@127.0.0.1:8126/"
        ))),
        Just(Value::Datetime("1979-05-27T07:32:00Z".parse().unwrap())),
    ]
}

/// Any TOML value: scalars, and arrays and tables of them, a few levels deep.
fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        let key = prop_oneof![
            "[a-z_]{1,8}",
            select(vec!["service", "comm", "exe", "path"]).prop_map(String::from)
        ];
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(key, inner, 0..4).prop_map(|m| Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A value for a secret key (`api_key`, `headers`): the secret, as text or in a table, or any.
fn secret_value() -> impl Strategy<Value = Value> {
    let header = Table::from_iter([(
        "Authorization".to_owned(),
        Value::String(format!("Bearer {SECRET}")),
    )]);
    prop_oneof![
        Just(Value::String(SECRET.into())),
        Just(Value::Table(header)),
        value(),
    ]
}

/// A configuration file: up to six of the schema's keys set to any values.
fn document(paths: Vec<String>) -> impl Strategy<Value = Table> {
    let entry = select(paths).prop_flat_map(|path| {
        let secret = ["api_key", "headers"].iter().any(|key| path.ends_with(key));
        let value = if secret {
            secret_value().boxed()
        } else {
            value().boxed()
        };
        (Just(path), value)
    });
    vec(entry, 0..6).prop_map(|entries| {
        let mut table = Table::new();
        for (path, value) in entries {
            match path.strip_prefix("producer.services.rules.") {
                // A field of a service rule: in a list of one rule.
                Some(field) => {
                    let mut rule = Table::new();
                    rule.insert(field.to_owned(), value);
                    set(
                        &mut table,
                        "producer.services.rules",
                        Value::Array(vec![Value::Table(rule)]),
                    );
                }
                None => set(&mut table, &path, value),
            }
        }
        table
    })
}

#[test]
fn any_value_for_any_key_is_an_error_or_a_config_that_prints_and_loads_back_and_no_secret_is_shown()
{
    let dir = tempfile::tempdir().unwrap();
    let paths = key_paths(dir.path());
    for expected in [
        "log_level",
        "producer.interval",
        "producer.replay.speed",
        "telemetry.listen",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} in {paths:?}"
        );
    }
    let outcomes: RefCell<BTreeMap<&str, usize>> = RefCell::default();
    let count = |outcome| *outcomes.borrow_mut().entry(outcome).or_default() += 1;
    // A fixed seed: the same cases on every run (change it to explore others).
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        rng_seed: RngSeed::Fixed(14),
        max_shrink_iters: 1000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&document(paths), |table| {
        let loaded = match load_table(dir.path(), &table) {
            Ok(loaded) => loaded,
            Err(e) => {
                count("refused");
                prop_assert!(!e.contains(SECRET), "a secret in the error: {}", e);
                return Ok(());
            }
        };
        let printed = loaded.to_redacted_toml();
        prop_assert!(
            !printed.contains(SECRET),
            "a secret in the printed config:\n{}",
            printed
        );
        if printed.contains("<redacted>") || printed.contains("***") {
            count("valid, with secrets");
            return Ok(());
        }
        count("valid, reloaded");
        let reloaded = load_text(dir.path(), &printed).map_err(|e| {
            TestCaseError::fail(format!("the printed config is refused: {e}\n{printed}"))
        })?;
        prop_assert_eq!(&reloaded.to_redacted_toml(), &printed);
        // NaN is not equal to itself: the text above compares those.
        if !printed.contains("nan") {
            prop_assert_eq!(&reloaded.config, &loaded.config, "{}", printed);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let outcomes = outcomes.into_inner();
    assert!(
        outcomes.get("valid, reloaded").is_some_and(|&n| n >= 50)
            && outcomes.contains_key("refused"),
        "too few cases of each kind: {outcomes:?}"
    );
}
