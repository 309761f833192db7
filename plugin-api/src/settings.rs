//! Reading a plugin's settings: the router hands each plugin its `[consumers.NAME]` table as
//! TOML text; these helpers parse it so that errors name the plugin, the key and the value.

use std::{borrow::Cow, time::Duration};

use serde::{de, de::DeserializeOwned, Deserialize, Deserializer};

use crate::PluginError;

/// Parses a plugin's TOML settings. The error quotes the offending line, which names the key
/// and the value: `perfdata: expected a duration like "60s", got "sixty" (in `rotate_interval = "sixty"`)`.
/// The value of a secret key ([`is_secret_key`]) is never shown, neither in the quoted line nor
/// in the message.
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
        let Some(start) = error
            .span()
            .map(|span| span.start)
            .filter(|&s| s <= text.len())
        else {
            return PluginError(format!("{plugin}: {message}"));
        };
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text.get(line_start..line_end).unwrap_or_default().trim();
        match secret_key_at(&text[..line_start], line) {
            Some(key) => PluginError(format!("{plugin}: {key}: {}", without_value(&message))),
            None if line.is_empty() => PluginError(format!("{plugin}: {message}")),
            None => PluginError(format!("{plugin}: {message} (in `{line}`)")),
        }
    })
}

/// Parts of key names whose values are secrets (matched case-insensitively): `api_key`,
/// `headers`, `auth_token`, `password`...
const SECRET_KEY_PARTS: [&str; 6] = ["key", "token", "password", "secret", "header", "auth"];

/// Whether the value of `key` (a name or a dotted path) is a secret that is never shown: an
/// API key, a token, a password, request headers.
///
/// ```
/// use plugin_api::settings::is_secret_key;
/// assert!(is_secret_key("api_key") && is_secret_key("headers.Authorization"));
/// assert!(!is_secret_key("endpoint"));
/// ```
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|part| key.contains(part))
}

/// The secret key that `line` sets, in the table that the last `[header]` of `before` opens:
/// `headers`, or `headers.Authorization` for a line of a `[headers]` table.
fn secret_key_at(before: &str, line: &str) -> Option<String> {
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(['[', ']']).trim());
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|_| !line.starts_with('['));
    let path = match (table, key) {
        (Some(table), Some(key)) => format!("{table}.{key}"),
        (Some(table), None) => table.to_owned(),
        (None, Some(key)) => key.to_owned(),
        (None, None) => return None,
    };
    is_secret_key(&path).then_some(path)
}

/// A deserialization `message` without the value it quotes: `invalid type: string "...",
/// expected a map` becomes `invalid type: string (the value is secret), expected a map`.
fn without_value(message: &str) -> String {
    let kind = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split([' ', ',']).next())
        .map_or("invalid value".to_owned(), |kind| {
            format!("invalid type: {kind}")
        });
    // Serde's messages end in ", expected ..."; ours start with "expected ..., got <value>".
    let expected = if message.starts_with("expected ") {
        message.split(", got ").next()
    } else {
        message.rfind(", expected ").map(|i| &message[i + 2..])
    };
    match expected {
        Some(expected) => format!("{kind} (the value is secret), {expected}"),
        None => format!("{kind} (the value is secret)"),
    }
}

/// `url` with the password in its userinfo replaced by `***` (`http://user:***@host/`), or the
/// whole userinfo when it has no password (`http://***@host/`: it may be a token), for showing
/// a URL in logs and errors. Text without userinfo comes back as it is.
///
/// ```
/// use plugin_api::settings::redact_url;
/// assert_eq!(redact_url("http://u:hunter2@collector:4318/v1"), "http://u:***@collector:4318/v1");
/// assert_eq!(redact_url("https://t0ken@intake/x?a=b@c"), "https://***@intake/x?a=b@c");
/// assert_eq!(redact_url("u:hunter2@collector:4317"), "u:***@collector:4317");
/// assert_eq!(redact_url("http://collector:4317"), "http://collector:4317");
/// ```
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let Some(at) = url[authority_start..authority_end].rfind('@') else {
        return Cow::Borrowed(url);
    };
    let shown = match url[authority_start..authority_start + at].split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    Cow::Owned(format!(
        "{}{shown}{}",
        &url[..authority_start],
        &url[authority_start + at..]
    ))
}

/// `text` with the userinfo of every URL in it hidden by [`redact_url`] (a URL runs from the
/// last space or quote before its `://` to the next one).
///
/// ```
/// use plugin_api::settings::redact_urls_in;
/// assert_eq!(
///     redact_urls_in("found string \"http://u:pw@h/x\", not https://t@i"),
///     "found string \"http://u:***@h/x\", not https://***@i"
/// );
/// ```
pub fn redact_urls_in(text: &str) -> String {
    let boundary = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`');
    let mut shown = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let start = rest[..scheme_end].rfind(boundary).map_or(0, |b| b + 1);
        let end = rest[scheme_end..]
            .find(boundary)
            .map_or(rest.len(), |e| scheme_end + e);
        shown.push_str(&rest[..start]);
        shown.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    shown.push_str(rest);
    shown
}

/// The longest duration a plugin setting takes: longer ones are mistakes, and would overflow
/// the clock arithmetic of whoever waits on them.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The largest size a plugin setting takes (1 TiB): sums of sizes never overflow.
pub const MAX_SIZE: u64 = 1 << 40;

/// Deserializes a duration written as text: `"10s"`, `"1m 30s"`, `"250ms"`, at most
/// [`MAX_DURATION`] (a week).
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    match humantime::parse_duration(text.trim()) {
        Ok(duration) if duration <= MAX_DURATION => Ok(duration),
        Ok(_) => Err(de::Error::custom(format!(
            "expected a duration of at most a week (\"7days\"), got \"{text}\""
        ))),
        Err(_) => Err(de::Error::custom(format!(
            "expected a duration like \"60s\", got \"{text}\""
        ))),
    }
}

/// Like [`duration`], for an optional key (use with `#[serde(default)]`).
pub fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Deserializes a size in bytes: a number, or text such as `"64MiB"`, `"1GiB"`, `"500kB"`; at most
/// [`MAX_SIZE`].
///
/// ```
/// use plugin_api::settings::{byte_size, parse};
/// #[derive(serde::Deserialize)]
/// struct Settings { #[serde(deserialize_with = "byte_size")] budget: u64 }
/// assert_eq!(parse::<Settings>("mine", "budget = \"8MiB\"").unwrap().budget, 8 << 20);
/// assert_eq!(parse::<Settings>("mine", "budget = 512").unwrap().budget, 512);
/// let err = parse::<Settings>("mine", "budget = \"lots\"").err().unwrap();
/// assert!(err.0.contains("expected a size like \"64MiB\", got \"lots\""), "{}", err.0);
/// ```
pub fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let bytes = match Size::deserialize(d)? {
        Size::Bytes(n) => n,
        Size::Text(text) => parse_size(&text).ok_or_else(|| {
            de::Error::custom(format!("expected a size like \"64MiB\", got \"{text}\""))
        })?,
    };
    if bytes > MAX_SIZE {
        return Err(de::Error::custom(format!(
            "expected a size of at most 1TiB, got {bytes} bytes"
        )));
    }
    Ok(bytes)
}

/// Like [`byte_size`], for an optional key (use with `#[serde(default)]`).
pub fn optional_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    byte_size(d).map(Some)
}

fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// Reads an environment variable for a plugin's settings; `None` when unset or empty.
/// Plugins take it as an [`EnvLookup`], so that tests can pass a fake environment.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// A source of environment variables (the process's: [`process_env`]).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::parse;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Table {
        #[serde(default)]
        headers: BTreeMap<String, String>,
        api_key: Option<String>,
        endpoint: Option<String>,
    }

    fn error(text: &str) -> String {
        parse::<Table>("otlp", text).unwrap_err().0
    }

    #[test]
    fn a_wrong_typed_secret_is_named_but_never_shown() {
        for (text, key) in [
            ("headers = \"Authorization=Bearer hunter2\"", "headers"),
            ("api_key = [\"hunter2\"]\nendpoint = \"x\"", "api_key"),
            ("[headers]\nAuthorization = 12345", "headers.Authorization"),
            ("headers.Authorization = 12345", "headers.Authorization"),
        ] {
            let error = error(text);
            assert!(
                error.starts_with(&format!("otlp: {key}: invalid type: ")),
                "{error}"
            );
            assert!(
                !error.contains("hunter2") && !error.contains("12345"),
                "{error}"
            );
        }
    }

    #[test]
    fn other_keys_still_show_their_value() {
        let error = error("endpoint = 4317");
        assert!(
            error.contains("4317") && error.contains("endpoint"),
            "{error}"
        );
    }
}
