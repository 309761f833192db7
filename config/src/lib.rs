//! Layered configuration of the profile router.
//!
//! Layers, lowest first: built-in defaults < `--config FILE` (TOML) < environment
//! (`ROUTER_` prefix, `__` for nesting: `ROUTER_PRODUCER__FREQUENCY_HZ=49`) < command-line
//! flags ([`FlagOverrides`]). Unknown keys and wrong types are errors that name the key, the
//! value and the layer it came from.

mod duration;
mod schema;
mod size;

use std::{
    fs::File,
    io::Read,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    value::{Dict, Map, Value},
    Figment, Metadata, Profile, Provider,
};

pub use duration::HumanDuration;
pub use schema::*;
pub use size::HumanBytes;

use plugin_api::settings::{is_secret_key, redact_url, redact_urls_in};
use probe_common::MAX_STACK_DEPTH;

/// A configuration that could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file does not exist or cannot be read.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        reason: String,
    },
    /// A key has a wrong type or value, or is unknown.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Values set by command-line flags, by dotted key path (`producer.interval`).
#[derive(Default, Debug, Clone)]
pub struct FlagOverrides(Dict);

impl FlagOverrides {
    /// Sets `key` (a dotted path such as `consumers.perfdata.path`) to `value`.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        let mut parts = key.split('.').peekable();
        let mut dict = &mut self.0;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                dict.insert(part.to_owned(), value.into());
                return;
            }
            let entry = dict
                .entry(part.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            dict = match entry {
                Value::Dict(_, d) => d,
                _ => unreachable!("made a dict above"),
            };
        }
    }
}

impl Provider for FlagOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flags")
            .interpolater(|_, keys| format!("--{}", keys.join(".")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.0.clone()))
    }
}

/// The merged configuration, with what is needed to say where each value came from.
pub struct LoadedConfig {
    /// The validated configuration.
    pub config: RouterConfig,
    figment: Figment,
}

/// Loads the configuration: defaults, then `file`, then `ROUTER_*` variables, then `flags`.
/// When no layer configures any consumer, the `perfdata` consumer runs (the built-in default).
pub fn load(file: Option<&Path>, flags: FlagOverrides) -> Result<LoadedConfig, ConfigError> {
    load_with_env(file, flags, EnvLayer::new("ROUTER_"))
}

/// The `PREFIX_A__B` environment variables, reporting errors by the variable's name.
struct EnvLayer {
    prefix: &'static str,
    env: Env,
}

impl EnvLayer {
    fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            env: Env::prefixed(prefix).split("__"),
        }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        let prefix = self.prefix;
        Metadata::named("environment variable")
            .interpolater(move |_, keys| format!("{prefix}{}", keys.join("__").to_uppercase()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.env.data()
    }
}

fn load_with_env(
    file: Option<&Path>,
    flags: FlagOverrides,
    env: EnvLayer,
) -> Result<LoadedConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(RouterConfig::default()));
    if let Some(path) = file {
        let text = read_config_file(path).map_err(|reason| ConfigError::File {
            path: path.to_owned(),
            reason,
        })?;
        toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        figment = figment.merge(TomlFileText {
            path: path.to_owned(),
            text,
        });
    }
    figment = figment.merge(env).merge(flags);

    let mut config: RouterConfig = figment
        .extract()
        .map_err(|e| ConfigError::Invalid(describe_figment_error(&figment, e)))?;
    if config.consumers.is_empty() {
        config.consumers.insert(
            "perfdata".into(),
            ConsumerEntry {
                plugin: None,
                enabled: true,
                queue_capacity: None,
                settings: toml::Table::new(),
            },
        );
    }
    let loaded = LoadedConfig { config, figment };
    loaded.validate()?;
    Ok(loaded)
}

/// The largest configuration file read; a bigger one is refused (a real one is a few KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// The text of the configuration file at `path`, read once: a regular file of at most
/// [`MAX_CONFIG_FILE_BYTES`]. Opened without blocking, so that a FIFO named by the path
/// cannot stall a start or a reload, and refused unless `fstat` says it is a regular file,
/// so that a device (`/dev/zero`) is never read. The error is the reason, to be named with
/// the path.
fn read_config_file(path: &Path) -> Result<String, String> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let metadata = file.metadata().map_err(|e| e.to_string())?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a file"
        };
        return Err(format!("{what}, not a regular file: refused"));
    }
    if metadata.len() > MAX_CONFIG_FILE_BYTES {
        return Err(format!(
            "{} bytes, more than the limit of {MAX_CONFIG_FILE_BYTES} bytes: refused",
            metadata.len()
        ));
    }
    // The file may grow after fstat: what is read stops one byte past the limit.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(format!(
            "grew past the limit of {MAX_CONFIG_FILE_BYTES} bytes while read: refused"
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))
}

/// The configuration file's layer: its TOML text, read once by [`read_config_file`], named
/// as the file in errors (figment's own file provider would read the path again, unbounded).
struct TomlFileText {
    path: PathBuf,
    text: String,
}

impl Provider for TomlFileText {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", self.path.as_path())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(&self.text).data()
    }
}

/// Figment's message, plus the offending value when there is one to show.
fn describe_figment_error(figment: &Figment, error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let value = (!key.is_empty() && !is_secret_key(&key))
                .then(|| figment.find_value(&key).ok())
                .flatten()
                .map(|v| format!(" (value: {})", render_value(&v)))
                .unwrap_or_default();
            // Figment's own message quotes a wrong-typed string: never a URL's password.
            redact_urls_in(&format!("{e}{value}"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn render_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("{:?}", redact_url(s)),
        Value::Dict(..) => "a table".into(),
        Value::Array(..) => "a list".into(),
        other => other.to_actual().to_string(),
    }
}

/// The largest queue capacity, in batches: beyond it a queue's count bound means nothing.
const MAX_QUEUE_CAPACITY: usize = 100_000;

impl LoadedConfig {
    /// Where the value of `key` (a dotted path) came from: `agent.toml TOML file`,
    /// `environment variable ROUTER_X`, `command-line flags`, or `built-in defaults`.
    pub fn source_of(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            Some(md) if md.name == "Serialized" || md.name == "Default" => {
                "built-in defaults".into()
            }
            Some(md) => {
                let place = md.interpolate(&Profile::Default, &key.split('.').collect::<Vec<_>>());
                match &md.source {
                    Some(source) => format!("{} {source} (key {place})", md.name),
                    None => format!("{} ({place})", md.name),
                }
            }
            None => "built-in defaults".into(),
        }
    }

    /// The merged configuration as TOML, with the values of secret keys
    /// ([`plugin_api::settings::is_secret_key`]) replaced by `"<redacted>"` and the passwords
    /// in URLs by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut value = toml::Value::try_from(&self.config).expect("config serializes to TOML");
        redact(&mut value);
        toml::to_string_pretty(&value).expect("TOML value prints")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let p = &c.producer;
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, value: String, expected: &str| {
            if !ok {
                problems.push(format!(
                    "{key} = {value} from {}: expected {expected}",
                    self.source_of(key.split('[').next().unwrap_or(key))
                ));
            }
        };
        check(
            (1..=10_000).contains(&p.frequency_hz),
            "producer.frequency_hz",
            p.frequency_hz.to_string(),
            "1 to 10000",
        );
        check(
            (1..=MAX_STACK_DEPTH as u32).contains(&p.max_stack_depth),
            "producer.max_stack_depth",
            p.max_stack_depth.to_string(),
            &format!("1 to {MAX_STACK_DEPTH}"),
        );
        check(
            (1 << 20..=4 << 30).contains(&p.unwind_table_budget.0),
            "producer.unwind_table_budget",
            format!("\"{}\"", p.unwind_table_budget),
            "1MiB to 4GiB",
        );
        for (i, rule) in p.services.rules.iter().enumerate() {
            let key = format!("producer.services.rules[{i}]");
            check(
                !rule.service.trim().is_empty(),
                &format!("{key}.service"),
                format!("{:?}", rule.service),
                "a service name",
            );
            check(
                rule.comm.is_some() || rule.exe.is_some() || rule.container_id.is_some(),
                &key,
                format!("{{ service = {:?} }}", rule.service),
                "at least one of comm, exe, container_id",
            );
            for (field, pattern) in [("comm", &rule.comm), ("exe", &rule.exe)] {
                if let Some(pattern) = pattern {
                    let compiled = regex::Regex::new(pattern);
                    check(
                        compiled.is_ok(),
                        &format!("{key}.{field}"),
                        format!("{pattern:?}"),
                        &format!(
                            "a regular expression ({})",
                            compiled.err().map(|e| e.to_string()).unwrap_or_default()
                        ),
                    );
                }
            }
        }
        check(
            (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&p.interval.0),
            "producer.interval",
            format!("\"{}\"", p.interval),
            "100ms to 1h",
        );
        check(
            (Duration::from_secs(1)..=Duration::from_secs(86_400))
                .contains(&c.telemetry.stale_after.0),
            "telemetry.stale_after",
            format!("\"{}\"", c.telemetry.stale_after),
            "1s to 1day",
        );
        check(
            c.shutdown_timeout.0 <= Duration::from_secs(3600),
            "shutdown_timeout",
            format!("\"{}\"", c.shutdown_timeout),
            "at most 1h",
        );
        check(
            (1..=MAX_QUEUE_CAPACITY).contains(&c.queue_capacity),
            "queue_capacity",
            c.queue_capacity.to_string(),
            &format!("1 to {MAX_QUEUE_CAPACITY}"),
        );
        check(
            is_log_filter(&c.log_level),
            "log_level",
            format!("{:?}", c.log_level),
            "a level (error, warn, info, debug, trace, off) or target=level items, \
             comma-separated, such as \"router=debug,warn\"",
        );
        check(
            p.replay.speed == 0.0 || (0.001..=1000.0).contains(&p.replay.speed),
            "producer.replay.speed",
            p.replay.speed.to_string(),
            "0 (as fast as possible) or 0.001 to 1000",
        );
        check(
            p.replay.repeat >= 1,
            "producer.replay.repeat",
            p.replay.repeat.to_string(),
            "at least 1",
        );
        check(
            p.kind != ProducerKind::Replay || p.replay.path.is_some(),
            "producer.replay.path",
            "(unset)".into(),
            "the recording to replay when producer.kind = \"replay\"",
        );
        for (name, entry) in &c.consumers {
            let key = format!("consumers.{name}");
            check(
                entry.plugin_file(name).is_some(),
                &format!("{key}.plugin"),
                "(unset)".into(),
                "a plugin file (only datadog, otlp and perfdata have a default)",
            );
            if let Some(capacity) = entry.queue_capacity {
                check(
                    (1..=MAX_QUEUE_CAPACITY).contains(&capacity),
                    &format!("{key}.queue_capacity"),
                    capacity.to_string(),
                    &format!("1 to {MAX_QUEUE_CAPACITY}"),
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }
}

/// Whether `filter` is a log filter whose every item is a level or `target=level`: a bare
/// word is a target to the filter syntax, so a misspelt level would silence every log line.
fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .is_ok()
        && filter
            .split(',')
            .map(str::trim)
            .all(|item| item.contains('=') || LEVELS.iter().any(|l| l.eq_ignore_ascii_case(item)))
}

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                if is_secret_key(key) {
                    *v = toml::Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact),
        toml::Value::String(text) if text.contains("://") => {
            *text = redact_url(text).into_owned();
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
