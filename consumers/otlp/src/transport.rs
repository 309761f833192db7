//! The transport: requests go through a [`DeliveryQueue`] (bounded, drop-oldest, counted) to
//! one thread that runs them on its own Tokio runtime; gRPC (tonic) or HTTP/protobuf
//! (reqwest), gzip, headers, TLS for https, retries with backoff and jitter on UNAVAILABLE /
//! 5xx / connection errors, honouring the server's Retry-After, and partial success reported.

use std::{
    io::Write,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use opentelemetry_proto::tonic::collector::profiles::v1development::{
    profiles_service_client::ProfilesServiceClient, ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
};
use plugin_api::delivery::{Attempt, Backoff, DeliveryQueue, Wording};
use prost::Message;
use tonic::{
    codec::CompressionEncoding,
    metadata::{MetadataKey, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::config::{Compression, Protocol, Settings};

/// The sending side of the consumer.
pub struct Transport {
    /// The requests on their way, and the delivery counters.
    pub queue: DeliveryQueue<ExportProfilesServiceRequest>,
    settings: Settings,
    partially_rejected: Arc<AtomicU64>,
}

impl Transport {
    /// The transport for `settings`, started by [`Transport::start`].
    pub fn new(settings: &Settings) -> Transport {
        let backoff = Backoff {
            first: settings.retry_backoff,
            max: settings.retry_max_backoff,
        };
        let wording = Wording {
            verb: "export",
            item: "request",
        };
        Transport {
            queue: DeliveryQueue::new("otlp-export", wording, settings.max_queue, backoff),
            settings: settings.clone(),
            partially_rejected: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts the export thread and its runtime, which ends with the thread.
    pub fn start(&mut self) -> Result<(), String> {
        let consumer = plugin_api::log::current_consumer();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_start(move || plugin_api::log::work_for(consumer.clone()))
            .build()
            .map_err(|e| format!("otlp: cannot start a Tokio runtime: {e}"))?;
        // tonic's lazy channel needs the runtime it will run on.
        let mut sender = {
            let _context = runtime.enter();
            Sender::new(&self.settings, self.partially_rejected.clone())?
        };
        self.queue
            .start(move |request: &ExportProfilesServiceRequest| {
                runtime.block_on(sender.send(request))
            })
            .map_err(|e| format!("otlp: cannot start the export thread: {e}"))
    }

    /// Profiles the receiver reported as rejected in partial successes.
    pub fn partially_rejected(&self) -> u64 {
        self.partially_rejected.load(Ordering::Relaxed)
    }
}

/// Sends one request over the configured protocol.
struct Sender {
    settings: Settings,
    grpc: Option<ProfilesServiceClient<Channel>>,
    http: Option<reqwest::Client>,
    partially_rejected: Arc<AtomicU64>,
}

impl Sender {
    fn new(settings: &Settings, partially_rejected: Arc<AtomicU64>) -> Result<Sender, String> {
        let invalid =
            |e: &dyn std::fmt::Display| format!("otlp: endpoint \"{}\": {e}", settings.endpoint);
        let (grpc, http) = match settings.protocol {
            Protocol::Grpc => {
                let mut endpoint = Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(|e| invalid(&e))?
                    .timeout(settings.timeout)
                    .connect_timeout(settings.timeout);
                if settings.endpoint.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &settings.ca_pem {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    endpoint = endpoint.tls_config(tls).map_err(|e| invalid(&e))?;
                }
                let mut client = ProfilesServiceClient::new(endpoint.connect_lazy());
                if settings.compression == Compression::Gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                (Some(client), None)
            }
            Protocol::HttpProtobuf => {
                let mut builder = reqwest::Client::builder().timeout(settings.timeout);
                if let Some(pem) = &settings.ca_pem {
                    let certificates = reqwest::Certificate::from_pem_bundle(pem)
                        .map_err(|e| format!("otlp: ca_file: {e}"))?;
                    builder = builder.tls_certs_merge(certificates);
                }
                let client = builder.build().map_err(|e| invalid(&e))?;
                (None, Some(client))
            }
        };
        for key in settings.headers.keys() {
            MetadataKey::<tonic::metadata::Ascii>::from_str(&key.to_ascii_lowercase())
                .map_err(|_| format!("otlp: headers: \"{key}\" is not a valid header name"))?;
        }
        Ok(Sender {
            settings: settings.clone(),
            grpc,
            http,
            partially_rejected,
        })
    }

    fn note_partial_success(&self, response: &ExportProfilesServiceResponse) {
        if let Some(partial) = &response.partial_success {
            if partial.rejected_profiles > 0 || !partial.error_message.is_empty() {
                plugin_api::warn!(
                    "receiver accepted the request partially: {} profiles rejected: {}",
                    partial.rejected_profiles,
                    partial.error_message
                );
                self.partially_rejected
                    .fetch_add(partial.rejected_profiles.max(0) as u64, Ordering::Relaxed);
            }
        }
    }

    async fn send(&mut self, request: &ExportProfilesServiceRequest) -> Attempt {
        let outcome = if let Some(client) = self.grpc.clone() {
            self.send_grpc(client, request).await
        } else {
            self.send_http(request).await
        };
        match outcome {
            Ok(()) => Attempt::Delivered {
                bytes: request.encoded_len() as u64,
            },
            Err(failure) => failure,
        }
    }

    async fn send_grpc(
        &mut self,
        mut client: ProfilesServiceClient<Channel>,
        request: &ExportProfilesServiceRequest,
    ) -> Result<(), Attempt> {
        let mut call = tonic::Request::new(request.clone());
        for (key, value) in &self.settings.headers {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_str(&key.to_ascii_lowercase()),
                MetadataValue::try_from(value.as_str()),
            ) {
                call.metadata_mut().insert(key, value);
            }
        }
        match client.export(call).await {
            Ok(response) => {
                self.note_partial_success(response.get_ref());
                Ok(())
            }
            Err(status) => {
                use tonic::Code::*;
                let reason = format!("gRPC {:?}: {}", status.code(), status.message());
                match status.code() {
                    Unavailable | DeadlineExceeded | Aborted | Cancelled | OutOfRange
                    | DataLoss | ResourceExhausted => Err(Attempt::Retry {
                        reason,
                        after: None,
                    }),
                    _ => Err(Attempt::Refused(reason)),
                }
            }
        }
    }

    async fn send_http(&mut self, request: &ExportProfilesServiceRequest) -> Result<(), Attempt> {
        let client = self.http.as_ref().expect("HTTP client for http/protobuf");
        let mut body = request.encode_to_vec();
        let mut call = client
            .post(&self.settings.endpoint)
            .header("content-type", "application/x-protobuf");
        if self.settings.compression == Compression::Gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            if gz.write_all(&body).is_ok() {
                if let Ok(compressed) = gz.finish() {
                    body = compressed;
                    call = call.header("content-encoding", "gzip");
                }
            }
        }
        for (key, value) in &self.settings.headers {
            call = call.header(key, value);
        }
        match call.body(body).send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let bytes = response.bytes().await.unwrap_or_default();
                if status.is_success() {
                    if let Ok(decoded) = ExportProfilesServiceResponse::decode(&bytes[..]) {
                        self.note_partial_success(&decoded);
                    }
                    return Ok(());
                }
                let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
                let reason = format!("HTTP {status}: {text}");
                if matches!(status.as_u16(), 429 | 502 | 503 | 504) || status.is_server_error() {
                    Err(Attempt::Retry {
                        reason,
                        after: retry_after,
                    })
                } else {
                    Err(Attempt::Refused(reason))
                }
            }
            Err(e) => {
                let mut reason = if e.is_timeout() {
                    "timed out".to_owned()
                } else {
                    "request failed".to_owned()
                };
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    reason.push_str(": ");
                    reason.push_str(&s.to_string());
                    source = s.source();
                }
                Err(Attempt::Retry {
                    reason,
                    after: None,
                })
            }
        }
    }
}
