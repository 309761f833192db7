//! The Datadog Agent's `/info`, asked once at startup: whether the Agent is there and takes
//! profiles. Profiles queue (bounded) either way; this only says early, in one line, what an
//! operator has to fix, and keeps saying it on `/healthz` until an upload gets through.

use reqwest::blocking::Client;

/// The Agent's profiling endpoint, as `/info` lists it.
pub const PROFILING_ENDPOINT: &str = "/profiling/v1/input";

/// The `/info` URL of the Agent that `profiling_url` (`http://host:8126/profiling/v1/input`)
/// points at.
///
/// ```
/// use consumer_datadog::agent_info::info_url;
/// assert_eq!(info_url("http://10.0.0.7:8126/profiling/v1/input"), "http://10.0.0.7:8126/info");
/// ```
pub fn info_url(profiling_url: &str) -> String {
    let base = profiling_url
        .strip_suffix(PROFILING_ENDPOINT)
        .unwrap_or(profiling_url);
    format!("{}/info", base.trim_end_matches('/'))
}

/// What is wrong with the Agent for profiles, in one sentence; `None` when it takes them.
///
/// ```
/// use consumer_datadog::agent_info::problem_in;
/// let ok = r#"{"version": "7.52.0", "endpoints": ["/v0.4/traces", "/profiling/v1/input"]}"#;
/// assert_eq!(problem_in("http://a:8126/info", ok), None);
/// let old = r#"{"version": "7.19.0", "endpoints": ["/v0.4/traces"]}"#;
/// let problem = problem_in("http://a:8126/info", old).unwrap();
/// assert!(problem.contains("7.19.0") && problem.contains("/profiling/v1/input"), "{problem}");
/// ```
pub fn problem_in(url: &str, body: &str) -> Option<String> {
    let info: serde_json::Value = match serde_json::from_str(body) {
        Ok(info) => info,
        Err(_) => {
            return Some(format!(
                "the Datadog Agent's {url} is not JSON: is this a Datadog Agent?"
            ))
        }
    };
    let listed = info["endpoints"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| e.as_str() == Some(PROFILING_ENDPOINT)));
    (!listed).then(|| {
        let version = info["version"].as_str().unwrap_or("of unknown version");
        format!(
            "the Datadog Agent {version} at {url} does not list {PROFILING_ENDPOINT} among its endpoints: \
             it takes no profiles (upgrade it to 7.20 or later, with APM enabled: apm_config.enabled); \
             profiles stay queued until it does"
        )
    })
}

/// Asks the Agent behind `profiling_url`; the problem, if any (none when it is too old to
/// have `/info`: its uploads will tell).
pub fn check(client: &Client, profiling_url: &str) -> Option<String> {
    let url = info_url(profiling_url);
    let shown = plugin_api::settings::redact_url(&url);
    match client.get(&url).send().and_then(|r| r.error_for_status()) {
        Ok(response) => problem_in(&shown, &response.text().unwrap_or_default()),
        // An Agent older than 7.28 has no /info; the uploads will tell.
        Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => None,
        Err(e) => Some(format!(
            "the Datadog Agent is not reachable at {shown} ({}): profiles stay queued until it is; \
             check that the Agent runs with APM enabled and that agent_url, DD_AGENT_HOST or \
             DD_TRACE_AGENT_URL point at it",
            crate::exporter::describe_error(&e)
        )),
    }
}
