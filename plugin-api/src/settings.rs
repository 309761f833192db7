//! Reading a plugin's settings: the router hands each plugin its `[consumers.NAME]` table as
//! TOML text; these helpers parse it so that errors name the plugin, the key and the value.

use std::time::Duration;

use serde::{de, de::DeserializeOwned, Deserialize, Deserializer};

use crate::PluginError;

/// Parses a plugin's TOML settings. The error quotes the offending line, which names the key
/// and the value: `perfdata: expected a duration like "60s", got "sixty" (in `rotate_interval = "sixty"`)`.
///
/// ```
/// use plugin_api::settings::{parse, duration};
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct Settings { #[serde(deserialize_with = "duration")] every: std::time::Duration }
/// let ok: Settings = parse("mine", "every = \"1m\"").unwrap();
/// assert_eq!(ok.every.as_secs(), 60);
/// let err = parse::<Settings>("mine", "every = \"sixty\"").err().unwrap();
/// assert_eq!(err.0, "mine: expected a duration like \"60s\", got \"sixty\" (in `every = \"sixty\"`)");
/// ```
pub fn parse<T: DeserializeOwned>(plugin: &str, text: &str) -> Result<T, PluginError> {
    toml::from_str(text).map_err(|error| {
        let message = error.message().trim().replace('\n', " ");
        let line = error.span().and_then(|span| {
            let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let end = text[span.start..]
                .find('\n')
                .map_or(text.len(), |i| span.start + i);
            Some(text.get(start..end)?.trim().to_owned())
        });
        PluginError(match line {
            // Never echo a line that may hold a secret.
            Some(line) if !line.is_empty() && !is_secret_line(&line) => {
                format!("{plugin}: {message} (in `{line}`)")
            }
            _ => format!("{plugin}: {message}"),
        })
    })
}

fn is_secret_line(line: &str) -> bool {
    let key = line
        .split('=')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    ["key", "token", "password", "secret", "header"]
        .iter()
        .any(|s| key.contains(s))
}

/// Deserializes a duration written as text: `"10s"`, `"1m 30s"`, `"250ms"`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim())
        .map_err(|_| de::Error::custom(format!("expected a duration like \"60s\", got \"{text}\"")))
}

/// Like [`duration`], for an optional key (use with `#[serde(default)]`).
pub fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Reads an environment variable for a plugin's settings; `None` when unset or empty.
/// Plugins take it as an [`EnvLookup`], so that tests can pass a fake environment.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// A source of environment variables (the process's: [`process_env`]).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;
