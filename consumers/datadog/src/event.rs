//! The `event.json` part of an upload (intake format version 4) and its tags.

use std::time::{Duration, UNIX_EPOCH};

use crate::config::Settings;

/// Name of this profiler in tags and headers.
pub const PROFILER_NAME: &str = "profile-router";
/// Version of this profiler.
pub const PROFILER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The one attachment every upload carries.
pub const ATTACHMENT: &str = "cpu.pprof";

/// What one upload describes.
#[derive(Debug, Clone)]
pub struct ProfileInfo {
    /// Start, ns since the epoch.
    pub start_ns: u64,
    /// End, ns since the epoch.
    pub end_ns: u64,
    /// Sequence number of this profile since the consumer started.
    pub seq: u64,
    /// Host name of the profiled machine.
    pub host: String,
    /// CPU architecture.
    pub arch: String,
    /// Whether frames were left for Datadog to symbolize.
    pub remote_symbols: bool,
    /// The processes' service, when the profile holds one service's samples.
    pub service: Option<ProcessService>,
}

/// A service as the router found it for the profile's processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessService {
    /// Its name.
    pub name: String,
    /// Whether the name is only the executable's (`service_inferred:yes`).
    pub inferred: bool,
    /// The processes' `DD_ENV`.
    pub env: Option<String>,
    /// The processes' `DD_VERSION`.
    pub version: Option<String>,
}

/// The most characters of a tag's value: Datadog's limit for a whole tag is 200.
pub const MAX_TAG_VALUE_CHARS: usize = 200;

/// One `key:value` tag of `tags_profiler`, whatever `value` holds: the router hands over
/// values that processes chose, and a comma or a line break in one must stay inside its
/// tag instead of starting another. Control characters and commas in `value` become `_`,
/// and it is cut at [`MAX_TAG_VALUE_CHARS`] characters (on a character boundary).
///
/// ```
/// use consumer_datadog::event::tag;
/// assert_eq!(tag("service", "web"), "service:web");
/// assert_eq!(tag("service", "svc\ninjected,env:prod"), "service:svc_injected_env:prod");
/// assert_eq!(tag("env", &"e".repeat(500)).len(), "env:".len() + 200);
/// ```
pub fn tag(key: &str, value: &str) -> String {
    let mut tag = String::with_capacity(key.len() + 1 + value.len().min(MAX_TAG_VALUE_CHARS));
    tag.push_str(key);
    tag.push(':');
    tag.extend(value.chars().take(MAX_TAG_VALUE_CHARS).map(|c| {
        if c.is_control() || c == ',' {
            '_'
        } else {
            c
        }
    }));
    tag
}

/// The comma-separated `tags_profiler` string; every value passes through [`tag`].
///
/// ```
/// use consumer_datadog::{config::Settings, event::{tags, ProcessService, ProfileInfo}};
/// let settings = Settings::from_toml_and_env("service = \"web\"\ntags = [\"team:perf\"]", &|_| None).unwrap();
/// let mut info = ProfileInfo { start_ns: 0, end_ns: 1, seq: 3, host: "h1".into(), arch: "x86_64".into(), remote_symbols: true, service: None };
/// let t = tags(&settings, &info);
/// assert!(t.starts_with("service:web,host:h1,runtime:ebpf,"), "{t}");
/// assert!(t.contains(",profile_seq:3,") && t.ends_with(",remote_symbols:yes,team:perf"), "{t}");
/// assert!(!t.contains("env:"));
///
/// // A process's own service, inferred from its executable, with its DD_ENV.
/// info.service = Some(ProcessService { name: "gamma-bin".into(), inferred: true, env: Some("staging".into()), version: None });
/// let t = tags(&settings, &info);
/// assert!(t.starts_with("service:gamma-bin,service_inferred:yes,env:staging,host:h1,"), "{t}");
/// ```
pub fn tags(settings: &Settings, info: &ProfileInfo) -> String {
    let process = info.service.as_ref();
    let service = process.map_or(settings.service.as_str(), |s| s.name.as_str());
    let mut tags = vec![tag("service", service)];
    if let Some(process) = process {
        let inferred = if process.inferred { "yes" } else { "no" };
        tags.push(tag("service_inferred", inferred));
    }
    let env = process
        .and_then(|s| s.env.as_ref())
        .or(settings.env.as_ref());
    if let Some(env) = env {
        tags.push(tag("env", env));
    }
    let version = process
        .and_then(|s| s.version.as_ref())
        .or(settings.version.as_ref());
    if let Some(version) = version {
        tags.push(tag("version", version));
    }
    tags.push(tag("host", &info.host));
    if let Some(cluster) = &settings.cluster_name {
        tags.push(tag("cluster_name", cluster));
    }
    tags.extend([
        "runtime:ebpf".to_owned(),
        format!("profiler_name:{PROFILER_NAME}"),
        format!("profiler_version:{PROFILER_VERSION}"),
        tag("cpu_arch", &info.arch),
        format!("profile_seq:{}", info.seq),
    ]);
    if info.remote_symbols {
        tags.push("remote_symbols:yes".to_owned());
    }
    tags.extend(settings.tags.iter().cloned());
    tags.join(",")
}

/// The `event.json` document.
pub fn event_json(settings: &Settings, info: &ProfileInfo) -> String {
    serde_json::json!({
        "attachments": [ATTACHMENT],
        "tags_profiler": tags(settings, info),
        "start": rfc3339_nanos(info.start_ns),
        "end": rfc3339_nanos(info.end_ns),
        "family": "ebpf",
        "version": "4",
        "endpoint_counts": null,
    })
    .to_string()
}

/// UTC RFC 3339 with nanoseconds and a trailing `Z`.
///
/// ```
/// assert_eq!(consumer_datadog::event::rfc3339_nanos(1_700_000_000_000_000_001), "2023-11-14T22:13:20.000000001Z");
/// ```
pub fn rfc3339_nanos(ns: u64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_service_env_or_version_stays_inside_its_own_tag() {
        let settings = Settings::from_toml_and_env("", &|_| None).unwrap();
        let info = ProfileInfo {
            start_ns: 0,
            end_ns: 1,
            seq: 0,
            host: "h1".into(),
            arch: "x86_64".into(),
            remote_symbols: false,
            service: Some(ProcessService {
                name: "svc\ninjected,env:prod,version:666".into(),
                inferred: false,
                env: Some(format!("staging,{}", "x".repeat(1000))),
                version: Some("1\r\n,team:evil".into()),
            }),
        };
        let tags = tags(&settings, &info);
        assert!(!tags.contains(['\n', '\r']), "{tags}");
        let keys: Vec<&str> = tags
            .split(',')
            .map(|t| t.split_once(':').unwrap().0)
            .collect();
        assert_eq!(
            keys,
            [
                "service",
                "service_inferred",
                "env",
                "version",
                "host",
                "runtime",
                "profiler_name",
                "profiler_version",
                "cpu_arch",
                "profile_seq"
            ],
            "{tags}"
        );
        let env = tags.split(',').find(|t| t.starts_with("env:")).unwrap();
        assert_eq!(env.len(), "env:".len() + MAX_TAG_VALUE_CHARS);
        assert!(
            tags.starts_with("service:svc_injected_env:prod_version:666,"),
            "{tags}"
        );
    }
}
