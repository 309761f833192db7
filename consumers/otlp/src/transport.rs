//! The transport: a bounded queue of requests (drop-oldest, counted) drained by one thread
//! running its own Tokio runtime; gRPC (tonic) or HTTP/protobuf (reqwest), gzip, headers, TLS
//! for https, retries with backoff and jitter on UNAVAILABLE / 5xx / connection errors,
//! honouring the server's Retry-After, and partial success reported.

use std::{
    collections::VecDeque,
    io::Write,
    str::FromStr,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::profiles::v1development::{
    profiles_service_client::ProfilesServiceClient, ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
};
use prost::Message;
use rand::Rng;
use tokio::sync::Notify;
use tonic::{
    codec::CompressionEncoding,
    metadata::{MetadataKey, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::config::{Compression, Protocol, Settings};

/// Counters of the transport.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    /// Requests the receiver accepted.
    pub exported: u64,
    /// Requests dropped because the queue was full.
    pub dropped: u64,
    /// Requests refused with a non-retryable error.
    pub rejected: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Profiles the receiver reported as rejected in a partial success.
    pub partially_rejected: u64,
    /// Encoded request bytes the receiver accepted (before compression).
    pub exported_bytes: u64,
    /// Time spent in successful exports, microseconds.
    pub export_micros: u64,
    /// Requests waiting in the queue.
    pub queued: u64,
}

#[derive(Default)]
struct State {
    queue: VecDeque<(u64, ExportProfilesServiceRequest)>,
    in_flight: bool,
    stats: ExportStats,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled whenever the queue drains or a request finishes.
    settled: Condvar,
    /// Wakes the sender: new work, or a flush that wants an attempt now.
    wake: Notify,
}

/// The sending side of the consumer.
pub struct Transport {
    shared: Arc<Shared>,
    max_queue: usize,
}

enum Outcome {
    Done,
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Reject(String),
}

impl Transport {
    /// Starts the sender thread and its runtime.
    pub fn start(settings: &Settings) -> Result<Transport, String> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            settled: Condvar::new(),
            wake: Notify::new(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("otlp: cannot start a Tokio runtime: {e}"))?;
        // tonic's lazy channel needs the runtime it will run on.
        let sender = {
            let _context = runtime.enter();
            Sender::new(settings)?
        };
        let worker = shared.clone();
        let retry = (settings.retry_backoff, settings.retry_max_backoff);
        thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || runtime.block_on(send_forever(&worker, sender, retry)))
            .map_err(|e| format!("otlp: cannot start the export thread: {e}"))?;
        Ok(Transport {
            shared,
            max_queue: settings.max_queue,
        })
    }

    /// Queues a request; the oldest queued one is dropped (and counted) when the queue is full.
    pub fn enqueue(&self, seq: u64, request: ExportProfilesServiceRequest) {
        let mut state = self.shared.state.lock().unwrap();
        if state.queue.len() >= self.max_queue {
            if let Some((old, _)) = state.queue.pop_front() {
                state.stats.dropped += 1;
                plugin_api::warn!(
                    "export queue full ({} requests): dropped request #{old} ({} dropped so far)",
                    self.max_queue,
                    state.stats.dropped
                );
            }
        }
        state.queue.push_back((seq, request));
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Waits until everything queued was exported or refused, for at most `timeout`; returns
    /// how many requests are still pending.
    pub fn wait_until_drained(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        self.shared.wake.notify_one();
        let mut state = self.shared.state.lock().unwrap();
        while !state.queue.is_empty() || state.in_flight {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.shared.settled.wait_timeout(state, left).unwrap().0;
        }
        state.queue.len() + usize::from(state.in_flight)
    }

    /// The transport's counters.
    pub fn stats(&self) -> ExportStats {
        let state = self.shared.state.lock().unwrap();
        ExportStats {
            queued: state.queue.len() as u64,
            ..state.stats
        }
    }
}

async fn send_forever(
    shared: &Shared,
    mut sender: Sender,
    (first_backoff, max_backoff): (Duration, Duration),
) {
    loop {
        let next = {
            let mut state = shared.state.lock().unwrap();
            let next = state.queue.pop_front();
            state.in_flight = next.is_some();
            next
        };
        let Some((seq, request)) = next else {
            shared.settled.notify_all();
            shared.wake.notified().await;
            continue;
        };
        let mut backoff = first_backoff;
        loop {
            let started = Instant::now();
            match sender.send(&request).await {
                Outcome::Done => {
                    let mut state = shared.state.lock().unwrap();
                    state.stats.exported += 1;
                    state.stats.exported_bytes += request.encoded_len() as u64;
                    state.stats.export_micros += started.elapsed().as_micros() as u64;
                    break;
                }
                Outcome::Reject(reason) => {
                    plugin_api::error!("export of request #{seq} refused: {reason} (not retried)");
                    shared.state.lock().unwrap().stats.rejected += 1;
                    break;
                }
                Outcome::Retry { reason, after } => {
                    let jitter = rand::rng().random_range(0.5..1.5);
                    let wait = after.unwrap_or(backoff.mul_f64(jitter)).min(max_backoff);
                    plugin_api::warn!(
                        "export of request #{seq} failed: {reason}; retrying in {wait:.1?}"
                    );
                    shared.state.lock().unwrap().stats.retries += 1;
                    // A new request or a flush cuts the wait short.
                    let _ = tokio::time::timeout(wait, shared.wake.notified()).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
        if let Some(rejected) = sender.take_partial_success() {
            shared.state.lock().unwrap().stats.partially_rejected += rejected;
        }
        shared.state.lock().unwrap().in_flight = false;
        shared.settled.notify_all();
    }
}

/// Sends one request over the configured protocol.
struct Sender {
    settings: Settings,
    grpc: Option<ProfilesServiceClient<Channel>>,
    http: Option<reqwest::Client>,
    partially_rejected: Option<u64>,
}

impl Sender {
    fn new(settings: &Settings) -> Result<Sender, String> {
        let invalid =
            |e: &dyn std::fmt::Display| format!("otlp: endpoint \"{}\": {e}", settings.endpoint);
        let (grpc, http) = match settings.protocol {
            Protocol::Grpc => {
                let mut endpoint = Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(|e| invalid(&e))?
                    .timeout(settings.timeout)
                    .connect_timeout(settings.timeout);
                if settings.endpoint.starts_with("https://") {
                    endpoint = endpoint
                        .tls_config(ClientTlsConfig::new().with_native_roots())
                        .map_err(|e| invalid(&e))?;
                }
                let mut client = ProfilesServiceClient::new(endpoint.connect_lazy());
                if settings.compression == Compression::Gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                (Some(client), None)
            }
            Protocol::HttpProtobuf => {
                let client = reqwest::Client::builder()
                    .timeout(settings.timeout)
                    .build()
                    .map_err(|e| invalid(&e))?;
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
            partially_rejected: None,
        })
    }

    fn take_partial_success(&mut self) -> Option<u64> {
        self.partially_rejected.take()
    }

    fn note_partial_success(&mut self, response: &ExportProfilesServiceResponse) {
        if let Some(partial) = &response.partial_success {
            if partial.rejected_profiles > 0 || !partial.error_message.is_empty() {
                plugin_api::warn!(
                    "receiver accepted the request partially: {} profiles rejected: {}",
                    partial.rejected_profiles,
                    partial.error_message
                );
                self.partially_rejected = Some(partial.rejected_profiles.max(0) as u64);
            }
        }
    }

    async fn send(&mut self, request: &ExportProfilesServiceRequest) -> Outcome {
        if let Some(client) = self.grpc.clone() {
            self.send_grpc(client, request).await
        } else {
            self.send_http(request).await
        }
    }

    async fn send_grpc(
        &mut self,
        mut client: ProfilesServiceClient<Channel>,
        request: &ExportProfilesServiceRequest,
    ) -> Outcome {
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
                Outcome::Done
            }
            Err(status) => {
                use tonic::Code::*;
                let reason = format!("gRPC {:?}: {}", status.code(), status.message());
                match status.code() {
                    Unavailable | DeadlineExceeded | Aborted | Cancelled | OutOfRange
                    | DataLoss | ResourceExhausted => Outcome::Retry {
                        reason,
                        after: None,
                    },
                    _ => Outcome::Reject(reason),
                }
            }
        }
    }

    async fn send_http(&mut self, request: &ExportProfilesServiceRequest) -> Outcome {
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
                    return Outcome::Done;
                }
                let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
                let reason = format!("HTTP {status}: {text}");
                if matches!(status.as_u16(), 429 | 502 | 503 | 504) || status.is_server_error() {
                    Outcome::Retry {
                        reason,
                        after: retry_after,
                    }
                } else {
                    Outcome::Reject(reason)
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
                Outcome::Retry {
                    reason,
                    after: None,
                }
            }
        }
    }
}
