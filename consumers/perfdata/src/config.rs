//! The perfdata consumer's settings: its `[consumers.NAME]` table.

use std::{path::PathBuf, time::Duration};

use serde::{de, Deserialize, Deserializer};

/// Settings of the perf.data consumer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Folder the files go to (created when missing).
    pub path: PathBuf,
    /// A new file at least this often.
    #[serde(deserialize_with = "plugin_api::settings::duration")]
    pub rotate_interval: Duration,
    /// A new file once the current one holds this many bytes of records.
    #[serde(deserialize_with = "byte_size")]
    pub rotate_size: u64,
    /// Keep at most this many perf.data files (oldest deleted first).
    pub retention_count: usize,
    /// Keep at most this many bytes of files in all, .folded and .svg included.
    #[serde(deserialize_with = "byte_size")]
    pub retention_bytes: u64,
    /// Write folded stacks and an SVG flame graph beside each perf.data file.
    pub flamegraph: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/profile-router/profiles"),
            rotate_interval: Duration::from_secs(60),
            rotate_size: 64 << 20,
            retention_count: 60,
            retention_bytes: 1 << 30,
            flamegraph: true,
        }
    }
}

impl Settings {
    /// Parses the consumer's TOML table; the error names the key and the value.
    ///
    /// ```
    /// use consumer_perfdata::config::Settings;
    /// let s = Settings::from_toml("path = \"/tmp/p\"\nrotate_size = \"16MiB\"").unwrap();
    /// assert_eq!(s.rotate_size, 16 << 20);
    /// let e = Settings::from_toml("rotate_interval = \"sixty\"").unwrap_err();
    /// assert!(e.contains("rotate_interval") && e.contains("sixty"), "{e}");
    /// ```
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        let settings: Settings = plugin_api::settings::parse("perfdata", text).map_err(|e| e.0)?;
        if settings.retention_count == 0 {
            return Err("perfdata: retention_count: expected at least 1, got 0".into());
        }
        if settings.rotate_interval < Duration::from_secs(1) {
            return Err(format!(
                "perfdata: rotate_interval: expected at least 1s, got {:?}",
                settings.rotate_interval
            ));
        }
        Ok(settings)
    }
}

/// A size in bytes: a number, or text such as "64MiB", "1GiB", "500kB".
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(text) => parse_size(&text).ok_or_else(|| {
            de::Error::custom(format!("expected a size like \"64MiB\", got \"{text}\""))
        }),
    }
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
