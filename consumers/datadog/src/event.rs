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

/// The comma-separated `tags_profiler` string.
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
    let mut tags = vec![format!("service:{service}")];
    if let Some(process) = process {
        let inferred = if process.inferred { "yes" } else { "no" };
        tags.push(format!("service_inferred:{inferred}"));
    }
    let env = process
        .and_then(|s| s.env.as_ref())
        .or(settings.env.as_ref());
    if let Some(env) = env {
        tags.push(format!("env:{env}"));
    }
    let version = process
        .and_then(|s| s.version.as_ref())
        .or(settings.version.as_ref());
    if let Some(version) = version {
        tags.push(format!("version:{version}"));
    }
    tags.push(format!("host:{}", info.host));
    if let Some(cluster) = &settings.cluster_name {
        tags.push(format!("cluster_name:{cluster}"));
    }
    tags.extend([
        "runtime:ebpf".to_owned(),
        format!("profiler_name:{PROFILER_NAME}"),
        format!("profiler_version:{PROFILER_VERSION}"),
        format!("cpu_arch:{}", info.arch),
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
