//! The OTLP consumer's settings: its `[consumers.NAME]` table, completed from the OpenTelemetry
//! variables (OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT,
//! OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_CERTIFICATE, OTEL_RESOURCE_ATTRIBUTES,
//! OTEL_SERVICE_NAME) where it is silent.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use plugin_api::{
    delivery::QueueLimits,
    settings::{redact_url, EnvLookup},
};
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use tonic::metadata::{Ascii, MetadataKey};

/// Wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// OTLP/gRPC (default port 4317).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with a protobuf body (default port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// How samples are grouped into ResourceProfiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One resource per process.
    Process,
    /// One resource per container (processes outside containers: per process).
    Container,
    /// One resource per service, as the router found each process's (`DD_SERVICE`,
    /// `OTEL_SERVICE_NAME`, a rule, or the executable's name): how Pyroscope lists them.
    Service,
    /// One resource for the whole host.
    Host,
}

/// Body compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip.
    Gzip,
    /// None.
    None,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Table {
    endpoint: Option<String>,
    protocol: Option<Protocol>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    export_interval: Option<Duration>,
    max_queue: Option<usize>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_byte_size")]
    max_queue_bytes: Option<u64>,
    #[serde(default)]
    resource_attributes: BTreeMap<String, String>,
    compression: Option<Compression>,
    group_by: Option<GroupBy>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    retry_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "plugin_api::settings::optional_duration")]
    retry_max_backoff: Option<Duration>,
    ca_file: Option<PathBuf>,
}

/// The effective settings.
#[derive(Clone)]
pub struct Settings {
    /// Where requests go: for gRPC the server, for HTTP the full URL of the profiles path.
    pub endpoint: String,
    /// gRPC or HTTP/protobuf.
    pub protocol: Protocol,
    /// Extra request headers (tenant, auth). Never logged.
    pub headers: BTreeMap<String, String>,
    /// Timeout of one export.
    pub timeout: Duration,
    /// Export at most this often; zero: every batch.
    pub export_interval: Duration,
    /// Requests waiting at most; the oldest is dropped beyond.
    pub max_queue: usize,
    /// Bytes of requests waiting at most (encoded size); the oldest is dropped beyond.
    pub max_queue_bytes: u64,
    /// Resource attributes added to every resource.
    pub resource_attributes: BTreeMap<String, String>,
    /// Body compression.
    pub compression: Compression,
    /// Resource grouping.
    pub group_by: GroupBy,
    /// First wait before a retry.
    pub retry_backoff: Duration,
    /// Longest wait between retries.
    pub retry_max_backoff: Duration,
    /// PEM certificates trusted for https endpoints besides the system's roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {} (headers: {})",
            self.protocol,
            redact_url(&self.endpoint),
            self.headers.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

impl Settings {
    /// Settings from the TOML `text`, completed from the process environment.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        Self::from_toml_and_env(text, &plugin_api::settings::process_env)
    }

    /// Settings from the TOML `text`, completed from `env`.
    ///
    /// ```
    /// use consumer_otlp::config::{Protocol, Settings};
    /// let env = |k: &str| match k {
    ///     "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_string()),
    ///     "OTEL_RESOURCE_ATTRIBUTES" => Some("deployment.environment=prod,team=perf".to_string()),
    ///     _ => None,
    /// };
    /// let s = Settings::from_toml_and_env("protocol = \"http/protobuf\"", &env).unwrap();
    /// assert_eq!(s.protocol, Protocol::HttpProtobuf);
    /// assert_eq!(s.endpoint, "http://collector:4318/v1development/profiles");
    /// assert_eq!(s.resource_attributes["team"], "perf");
    /// ```
    pub fn from_toml_and_env(text: &str, env: EnvLookup<'_>) -> Result<Settings, String> {
        let t: Table = plugin_api::settings::parse("otlp", text).map_err(|e| e.0)?;
        let protocol = t.protocol.unwrap_or(Protocol::Grpc);
        let endpoint = match (t.endpoint, env("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT")) {
            (Some(endpoint), _) => signal_url(&endpoint, protocol),
            // The signal-specific variable is used as is.
            (None, Some(endpoint)) => endpoint,
            (None, None) => signal_url(
                &env("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|| match protocol {
                    Protocol::Grpc => "http://localhost:4317".into(),
                    Protocol::HttpProtobuf => "http://localhost:4318".into(),
                }),
                protocol,
            ),
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(format!(
                "otlp: endpoint: expected a URL starting with http:// or https://, got \"{}\"",
                redact_url(&endpoint)
            ));
        }
        let env_headers = parse_pairs(&env("OTEL_EXPORTER_OTLP_HEADERS").unwrap_or_default());
        let mut headers = BTreeMap::new();
        for (given, source) in [
            (env_headers, "OTEL_EXPORTER_OTLP_HEADERS"),
            (t.headers, "the headers table"),
        ] {
            for (name, value) in given {
                check_header(protocol, &name, &value, source)?;
                headers.insert(name, value);
            }
        }
        let mut resource_attributes =
            parse_pairs(&env("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default());
        if let Some(service) = env("OTEL_SERVICE_NAME") {
            resource_attributes.insert("service.name".into(), service);
        }
        resource_attributes.extend(t.resource_attributes);
        let ca_file = t.ca_file.or_else(|| {
            env("OTEL_EXPORTER_OTLP_PROFILES_CERTIFICATE")
                .or_else(|| env("OTEL_EXPORTER_OTLP_CERTIFICATE"))
                .map(PathBuf::from)
        });
        let ca_pem = ca_file
            .map(|path| read_ca_file(&path, &endpoint))
            .transpose()?;
        let max_queue = t.max_queue.unwrap_or(100);
        if max_queue == 0 {
            return Err("otlp: max_queue: expected at least 1, got 0".into());
        }
        let max_queue_bytes = QueueLimits::bytes_setting("otlp", t.max_queue_bytes)?;
        Ok(Settings {
            endpoint,
            protocol,
            headers,
            timeout: t.timeout.unwrap_or(Duration::from_secs(10)),
            export_interval: t.export_interval.unwrap_or(Duration::ZERO),
            max_queue,
            max_queue_bytes,
            resource_attributes,
            compression: t.compression.unwrap_or(Compression::Gzip),
            group_by: t.group_by.unwrap_or(GroupBy::Process),
            retry_backoff: t.retry_backoff.unwrap_or(Duration::from_secs(1)),
            retry_max_backoff: t.retry_max_backoff.unwrap_or(Duration::from_secs(30)),
            ca_pem,
        })
    }
}

/// Refuses a header that the protocol cannot send (a newline in a value, a space in a name),
/// naming the header and its `source`, never its value (it may be a credential).
fn check_header(protocol: Protocol, name: &str, value: &str, source: &str) -> Result<(), String> {
    let (name_ok, name_rule, value_ok, value_rule) = match protocol {
        Protocol::Grpc => (
            MetadataKey::<Ascii>::from_bytes(name.to_ascii_lowercase().as_bytes()).is_ok(),
            "a gRPC metadata key (letters, digits, - _ .; not ending in -bin)",
            // gRPC's ASCII-Value: printable ASCII and spaces (tonic would also pass non-ASCII).
            value.bytes().all(|b| (b' '..=b'~').contains(&b)),
            "printable ASCII characters and spaces",
        ),
        Protocol::HttpProtobuf => (
            HeaderName::from_bytes(name.as_bytes()).is_ok(),
            "an HTTP header name (letters, digits, ! # $ % & ' * + - . ^ _ ` | ~)",
            HeaderValue::from_str(value).is_ok(),
            "visible characters, spaces and tabs",
        ),
    };
    if !name_ok {
        return Err(format!(
            "otlp: headers: {name:?} from {source}: expected {name_rule}"
        ));
    }
    if !value_ok {
        return Err(format!(
            "otlp: headers: the value of {name:?} from {source} (not shown: it may be a secret): \
             expected {value_rule}, no newline or other control character"
        ));
    }
    Ok(())
}

/// The PEM text of `path`, which must hold a certificate and serve an https endpoint.
fn read_ca_file(path: &std::path::Path, endpoint: &str) -> Result<Vec<u8>, String> {
    let shown = path.display();
    if !endpoint.starts_with("https://") {
        return Err(format!(
            "otlp: ca_file \"{shown}\": the endpoint \"{}\" does not use TLS (https://)",
            redact_url(endpoint)
        ));
    }
    let pem = std::fs::read(path).map_err(|e| format!("otlp: ca_file \"{shown}\": {e}"))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "otlp: ca_file \"{shown}\": no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
        ));
    }
    Ok(pem)
}

/// For HTTP, the profiles path appended to a base endpoint; gRPC endpoints stay as they are.
fn signal_url(endpoint: &str, protocol: Protocol) -> String {
    match protocol {
        Protocol::Grpc => endpoint.to_owned(),
        Protocol::HttpProtobuf if endpoint.contains("/v1development/profiles") => {
            endpoint.to_owned()
        }
        Protocol::HttpProtobuf => {
            format!("{}/v1development/profiles", endpoint.trim_end_matches('/'))
        }
    }
}

/// `key1=value1,key2=value2` (the W3C baggage-like form of the OTEL_* variables).
fn parse_pairs(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Settings;

    #[test]
    fn the_ca_file_comes_from_the_otel_variable_and_needs_an_https_endpoint() {
        let dir = std::env::temp_dir().join(format!("otlp-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let path = ca.display().to_string();
        let env = |k: &str| (k == "OTEL_EXPORTER_OTLP_CERTIFICATE").then(|| path.clone());
        let https = Settings::from_toml_and_env("endpoint = \"https://collector:4317\"", &env);
        assert!(https.unwrap().ca_pem.is_some());
        let http = Settings::from_toml_and_env("endpoint = \"http://collector:4317\"", &env);
        let error = http.err().unwrap();
        assert!(error.contains("does not use TLS"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_header_the_protocol_cannot_send_is_refused_naming_it_but_not_its_value() {
        let no_env = |_: &str| None;
        for (protocol, table) in [
            ("grpc", "{ Authorization = \"Bearer s3cr3t\\nX: 1\" }"),
            ("grpc", "{ \"X-Token-bin\" = \"s3cr3t\" }"),
            ("grpc", "{ \"X-Tenant\" = \"s3cr3t é\" }"),
            ("http/protobuf", "{ Authorization = \"Bearer s3cr3t\\r\" }"),
            ("http/protobuf", "{ \"X Tenant\" = \"s3cr3t\" }"),
        ] {
            let text = format!("protocol = \"{protocol}\"\nheaders = {table}");
            let error = Settings::from_toml_and_env(&text, &no_env).err().unwrap();
            assert!(error.starts_with("otlp: headers: "), "{text}: {error}");
            assert!(error.contains("the headers table"), "{text}: {error}");
            assert!(!error.contains("s3cr3t"), "{text}: {error}");
        }
        let env = |k: &str| (k == "OTEL_EXPORTER_OTLP_HEADERS").then(|| "x-tenant=a\tb\x07".into());
        let error = Settings::from_toml_and_env("", &env).err().unwrap();
        assert!(
            error.contains("\"x-tenant\" from OTEL_EXPORTER_OTLP_HEADERS"),
            "{error}"
        );
        let fine = "headers = { X-Scope-OrgID = \"tenant 1\", authorization = \"Bearer a.b\" }";
        assert_eq!(
            Settings::from_toml_and_env(fine, &no_env)
                .unwrap()
                .headers
                .len(),
            2
        );
    }

    #[test]
    fn a_password_in_the_endpoint_is_never_shown() {
        let no_env = |_: &str| None;
        let settings =
            Settings::from_toml_and_env("endpoint = \"http://u:s3cr3t@collector:4317\"", &no_env);
        let shown = format!("{:?}", settings.unwrap());
        assert!(shown.contains("http://u:***@collector:4317"), "{shown}");
        let error = Settings::from_toml_and_env("endpoint = \"collector:s3cr3t@x:4317\"", &no_env);
        let error = error.err().unwrap();
        assert!(
            error.contains("endpoint") && !error.contains("s3cr3t"),
            "{error}"
        );
    }
}
