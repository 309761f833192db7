//! The perfdata consumer's settings: its `[consumers.NAME]` table.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Settings of the perf.data consumer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Folder the files go to (created when missing; an existing file is refused).
    pub path: PathBuf,
    /// A new file at least this often.
    #[serde(deserialize_with = "plugin_api::settings::duration")]
    pub rotate_interval: Duration,
    /// A new file once the current one holds this many bytes of records.
    #[serde(deserialize_with = "plugin_api::settings::byte_size")]
    pub rotate_size: u64,
    /// Keep at most this many perf.data files (oldest deleted first).
    pub retention_count: usize,
    /// Keep at most this many bytes of files in all, .folded and .svg included.
    #[serde(deserialize_with = "plugin_api::settings::byte_size")]
    pub retention_bytes: u64,
    /// Write folded stacks and an SVG flame graph beside each perf.data file.
    pub flamegraph: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/profile-router/profiles"),
            rotate_interval: Duration::from_secs(60),
            rotate_size: 8 << 20,
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
        check_folder(&settings.path)?;
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

/// Refuses a `path` that cannot be a folder: empty, or naming (or lying under) something that
/// exists and is not a folder. A folder that does not exist yet is fine: it is created.
fn check_folder(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("perfdata: path: expected a folder, got \"\"".into());
    }
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return Ok(());
    };
    if existing.is_dir() {
        return Ok(());
    }
    let what = if existing == path {
        "an existing file".to_owned()
    } else {
        format!("{} is a file", existing.display())
    };
    Err(format!(
        "perfdata: path: expected a folder, got \"{}\" ({what})",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_error(path: &Path) -> Option<String> {
        Settings::from_toml(&format!("path = \"{}\"", path.display())).err()
    }

    #[test]
    fn a_path_that_cannot_be_a_folder_is_refused_with_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("profiles.data");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            path_error(Path::new("")).as_deref(),
            Some("perfdata: path: expected a folder, got \"\"")
        );
        assert_eq!(
            path_error(&file),
            Some(format!(
                "perfdata: path: expected a folder, got \"{}\" (an existing file)",
                file.display()
            ))
        );
        assert_eq!(
            path_error(&file.join("below")),
            Some(format!(
                "perfdata: path: expected a folder, got \"{}/below\" ({} is a file)",
                file.display(),
                file.display()
            ))
        );
        assert_eq!(path_error(dir.path()), None);
        assert_eq!(path_error(&dir.path().join("new/folder")), None);
    }
}
