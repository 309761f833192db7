//! The Datadog consumer's settings: its `[consumers.NAME]` table, completed from Datadog's
//! usual environment variables (DD_SERVICE, DD_ENV, DD_VERSION, DD_TAGS, DD_AGENT_HOST,
//! DD_TRACE_AGENT_PORT, DD_TRACE_AGENT_URL, DD_API_KEY, DD_SITE, DD_CLUSTER_NAME) where the
//! table is silent.

use std::{borrow::Cow, fmt, time::Duration};

use plugin_api::{
    delivery::QueueLimits,
    settings::{redact_url, EnvLookup},
};
use serde::Deserialize;

/// How the pprof attachment is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd (what Datadog's own profilers send).
    Zstd,
    /// gzip.
    Gzip,
}

/// Settings as written in the table.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Table {
    agent_url: Option<String>,
    service: Option<String>,
    env: Option<String>,
    version: Option<String>,
    cluster_name: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    upload_interval: Option<Duration>,
    max_queue: Option<usize>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_byte_size")]
    max_queue_bytes: Option<u64>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    timeout: Option<Duration>,
    compression: Option<Compression>,
    api_key: Option<String>,
    site: Option<String>,
    intake_url: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    retry_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    retry_max_backoff: Option<Duration>,
    split_by_service: Option<bool>,
    max_services: Option<usize>,
}

/// Where profiles go.
#[derive(Clone, PartialEq, Eq)]
pub enum Destination {
    /// The Datadog Agent's profiling endpoint.
    Agent {
        /// Its URL.
        url: String,
    },
    /// Datadog's intake, directly, with an API key.
    Agentless {
        /// `https://intake.profile.<site>/api/v2/profile`.
        url: String,
        /// The key (never logged).
        api_key: String,
    },
}

impl Destination {
    /// The URL profiles are posted to.
    pub fn url(&self) -> &str {
        match self {
            Destination::Agent { url } | Destination::Agentless { url, .. } => url,
        }
    }

    /// The URL for logs and errors: any password in it replaced by `***`.
    pub fn shown_url(&self) -> Cow<'_, str> {
        redact_url(self.url())
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Agent { .. } => write!(f, "agent {}", self.shown_url()),
            Destination::Agentless { .. } => {
                write!(f, "agentless {} (api key redacted)", self.shown_url())
            }
        }
    }
}

/// The effective settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where profiles go.
    pub destination: Destination,
    /// `service` tag.
    pub service: String,
    /// `env` tag, only when set.
    pub env: Option<String>,
    /// `version` tag, only when set.
    pub version: Option<String>,
    /// `cluster_name` tag, only when set.
    pub cluster_name: Option<String>,
    /// Extra `key:value` tags (config, then DD_TAGS).
    pub tags: Vec<String>,
    /// One upload per this much profiled time.
    pub upload_interval: Duration,
    /// Profiles waiting for upload at most; the oldest is dropped beyond.
    pub max_queue: usize,
    /// Bytes of profiles waiting for upload at most; the oldest is dropped beyond.
    pub max_queue_bytes: u64,
    /// Timeout of one upload request.
    pub timeout: Duration,
    /// Compression of the pprof.
    pub compression: Compression,
    /// First wait before a retry (doubles each time, with jitter).
    pub retry_backoff: Duration,
    /// Longest wait between retries.
    pub retry_max_backoff: Duration,
    /// One upload per service (each process's own, as the router inferred it) and interval,
    /// as Datadog's host profiler sends them; `false`: one upload under `service`.
    pub split_by_service: bool,
    /// Most uploads per interval when splitting; the other services' samples go into the
    /// upload of `service`, counted.
    pub max_services: usize,
}

impl Settings {
    /// Settings from the TOML `text`, completed from the process environment.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        Self::from_toml_and_env(text, &plugin_api::settings::process_env)
    }

    /// Settings from the TOML `text`, completed from `env`.
    ///
    /// ```
    /// use consumer_datadog::config::Settings;
    /// let env = |k: &str| (k == "DD_AGENT_HOST").then(|| "10.0.0.7".to_string());
    /// let s = Settings::from_toml_and_env("service = \"web\"", &env).unwrap();
    /// assert_eq!(s.destination.url(), "http://10.0.0.7:8126/profiling/v1/input");
    /// let e = Settings::from_toml_and_env("upload_interval = \"sixty\"", &env).unwrap_err();
    /// assert!(e.contains("upload_interval") && e.contains("\"sixty\""), "{e}");
    ///
    /// // Agentless: an API key and a site choose the intake; the key never shows.
    /// let env = |k: &str| (k == "DD_API_KEY").then(|| "s3cr3t".to_string());
    /// let s = Settings::from_toml_and_env("site = \"datadoghq.eu\"", &env).unwrap();
    /// assert_eq!(s.destination.url(), "https://intake.profile.datadoghq.eu/api/v2/profile");
    /// assert!(!format!("{s:?}").contains("s3cr3t"));
    /// ```
    pub fn from_toml_and_env(text: &str, env: EnvLookup<'_>) -> Result<Settings, String> {
        let t: Table = plugin_api::settings::parse("datadog", text).map_err(|e| e.0)?;
        let api_key = t.api_key.or_else(|| env("DD_API_KEY"));
        let destination = match (&t.agent_url, api_key) {
            (None, Some(api_key)) => {
                let site = t
                    .site
                    .or_else(|| env("DD_SITE"))
                    .unwrap_or_else(|| "datadoghq.com".into());
                Destination::Agentless {
                    url: t
                        .intake_url
                        .clone()
                        .unwrap_or_else(|| format!("https://intake.profile.{site}/api/v2/profile")),
                    api_key,
                }
            }
            _ => Destination::Agent {
                url: t
                    .agent_url
                    .clone()
                    .unwrap_or_else(|| agent_url_from_env(env)),
            },
        };
        if let Err(e) = reqwest::Url::parse(destination.url()) {
            return Err(format!(
                "datadog: agent_url: expected a URL, got \"{}\": {e}",
                destination.shown_url()
            ));
        }
        let mut tags = t.tags;
        if let Some(dd_tags) = env("DD_TAGS") {
            tags.extend(
                dd_tags
                    .split([',', ' '])
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
            );
        }
        let max_services = t.max_services.unwrap_or(100);
        if !(1..=10_000).contains(&max_services) {
            return Err(format!(
                "datadog: max_services: expected 1 to 10000, got {max_services}"
            ));
        }
        // Split by service, one upload interval makes a profile per service plus the
        // consumer's own: the queue holds two intervals' worth by default, never less than one.
        let split_by_service = t.split_by_service.unwrap_or(true);
        let per_interval = if split_by_service {
            max_services + 1
        } else {
            1
        };
        let max_queue = t.max_queue.unwrap_or(2 * per_interval);
        if !(per_interval..=100_000).contains(&max_queue) {
            return Err(format!(
                "datadog: max_queue: expected {per_interval} (the profiles of one upload \
                 interval) to 100000, got {max_queue}"
            ));
        }
        let max_queue_bytes = QueueLimits::bytes_setting("datadog", t.max_queue_bytes)?;
        Ok(Settings {
            destination,
            service: t
                .service
                .or_else(|| env("DD_SERVICE"))
                .unwrap_or_else(|| "profile-router".into()),
            env: t.env.or_else(|| env("DD_ENV")),
            version: t.version.or_else(|| env("DD_VERSION")),
            cluster_name: t.cluster_name.or_else(|| env("DD_CLUSTER_NAME")),
            tags,
            upload_interval: t.upload_interval.unwrap_or(Duration::from_secs(60)),
            max_queue,
            max_queue_bytes,
            timeout: t.timeout.unwrap_or(Duration::from_secs(30)),
            compression: t.compression.unwrap_or(Compression::Zstd),
            retry_backoff: t.retry_backoff.unwrap_or(Duration::from_secs(1)),
            retry_max_backoff: t.retry_max_backoff.unwrap_or(Duration::from_secs(60)),
            split_by_service,
            max_services,
        })
    }
}

/// The agent URL from DD_TRACE_AGENT_URL, or DD_AGENT_HOST / DD_TRACE_AGENT_PORT, or localhost.
fn agent_url_from_env(env: EnvLookup<'_>) -> String {
    if let Some(url) = env("DD_TRACE_AGENT_URL") {
        return format!("{}/profiling/v1/input", url.trim_end_matches('/'));
    }
    let host = env("DD_AGENT_HOST").unwrap_or_else(|| "localhost".into());
    let port = env("DD_TRACE_AGENT_PORT").unwrap_or_else(|| "8126".into());
    format!("http://{host}:{port}/profiling/v1/input")
}

#[cfg(test)]
mod tests {
    use super::Settings;

    #[test]
    fn a_password_in_the_agent_url_is_never_shown() {
        let env =
            |k: &str| (k == "DD_TRACE_AGENT_URL").then(|| "http://dd:s3cr3t@agent:8126".into());
        let settings = Settings::from_toml_and_env("", &env).unwrap();
        assert_eq!(
            settings.destination.url(),
            "http://dd:s3cr3t@agent:8126/profiling/v1/input"
        );
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("http://dd:***@agent:8126/profiling/v1/input"),
            "{shown}"
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let no_env = |_: &str| None;
        let error = Settings::from_toml_and_env("agent_url = \"http://dd:s3cr3t@[::1/x\"", &no_env);
        let error = error.unwrap_err();
        assert!(
            error.contains("agent_url") && !error.contains("s3cr3t"),
            "{error}"
        );
    }

    #[test]
    fn the_queue_holds_at_least_one_upload_interval_of_every_service() {
        let no_env = |_: &str| None;
        let settings = Settings::from_toml_and_env("max_services = 10", &no_env).unwrap();
        assert_eq!(
            settings.max_queue, 22,
            "two intervals of 10 services and the own one"
        );
        let error =
            Settings::from_toml_and_env("max_services = 10\nmax_queue = 5", &no_env).unwrap_err();
        assert!(
            error.contains("max_queue") && error.contains("11"),
            "{error}"
        );
        let error = Settings::from_toml_and_env("max_services = 100000", &no_env).unwrap_err();
        assert!(error.contains("max_services"), "{error}");
    }
}
