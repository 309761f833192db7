//! The transport: requests go through a [`DeliveryQueue`] (bounded, drop-oldest, counted) to
//! one thread that runs them on its own Tokio runtime; gRPC (tonic) or HTTP/protobuf
//! (reqwest), gzip, headers, TLS for https, retries with backoff and jitter on the gRPC codes
//! the OpenTelemetry Collector retries / 429 and 5xx / connection errors, honouring the
//! server's RetryInfo or Retry-After, and partial success reported.

use std::{
    io::{Read, Write},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{BufMut, Bytes};
use flate2::{read::GzDecoder, write::GzEncoder};
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use plugin_api::{
    delivery::{Attempt, Backoff, DeliveryQueue, QueueItem, QueueLimits, Wording},
    settings::redact_url,
};
use prost::Message;
use tonic::{
    client::Grpc,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{http::uri::PathAndQuery, GrpcMethod},
    metadata::{MetadataKey, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::config::{Compression, Protocol, Settings};

/// A request waiting for export, held encoded and gzip-compressed (a sixth of its encoding,
/// a thirtieth of its decoded size), so that the queue's byte budget holds a few minutes of
/// requests rather than seconds; each attempt sends it without building it again.
pub struct QueuedRequest {
    gzipped: Bytes,
    /// The length of its encoding.
    encoded_len: usize,
}

impl QueuedRequest {
    /// `request`, encoded and compressed for the queue.
    pub fn new(request: &ExportProfilesServiceRequest) -> QueuedRequest {
        let encoded = request.encode_to_vec();
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let gzipped = gz
            .write_all(&encoded)
            .and_then(|()| gz.finish())
            .expect("compressing into memory cannot fail");
        QueuedRequest {
            gzipped: gzipped.into(),
            encoded_len: encoded.len(),
        }
    }

    /// The request's encoding, for an attempt (refused if it cannot be had).
    fn encoded(&self) -> Result<Bytes, Attempt> {
        let mut encoded = Vec::with_capacity(self.encoded_len);
        GzDecoder::new(&self.gzipped[..])
            .read_to_end(&mut encoded)
            .map_err(|e| Attempt::Refused(format!("cannot decompress the queued request: {e}")))?;
        Ok(encoded.into())
    }
}

impl QueueItem for QueuedRequest {
    fn size_bytes(&self) -> u64 {
        self.gzipped.len() as u64
    }
}

/// The sending side of the consumer.
pub struct Transport {
    /// The requests on their way, and the delivery counters.
    pub queue: DeliveryQueue<QueuedRequest>,
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
        let limits = QueueLimits {
            items: settings.max_queue,
            bytes: settings.max_queue_bytes,
        };
        Transport {
            queue: DeliveryQueue::new("otlp-export", wording, limits, backoff),
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
            .start(move |queued: &QueuedRequest| runtime.block_on(sender.send(queued)))
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
    grpc: Option<Grpc<Channel>>,
    http: Option<reqwest::Client>,
    partially_rejected: Arc<AtomicU64>,
}

impl Sender {
    fn new(settings: &Settings, partially_rejected: Arc<AtomicU64>) -> Result<Sender, String> {
        let invalid = |e: &dyn std::fmt::Display| {
            format!("otlp: endpoint \"{}\": {e}", redact_url(&settings.endpoint))
        };
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
                let mut client = Grpc::new(endpoint.connect_lazy());
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

    async fn send(&mut self, request: &QueuedRequest) -> Attempt {
        let outcome = if let Some(client) = self.grpc.clone() {
            self.send_grpc(client, request).await
        } else {
            self.send_http(request).await
        };
        match outcome {
            Ok(()) => Attempt::Delivered {
                bytes: request.encoded_len as u64,
            },
            Err(failure) => failure,
        }
    }

    /// The Export call of the profiles service, with the request's encoding as its message.
    async fn send_grpc(
        &mut self,
        mut client: Grpc<Channel>,
        request: &QueuedRequest,
    ) -> Result<(), Attempt> {
        let mut call = tonic::Request::new(request.encoded()?);
        for (key, value) in &self.settings.headers {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_str(&key.to_ascii_lowercase()),
                MetadataValue::try_from(value.as_str()),
            ) {
                call.metadata_mut().insert(key, value);
            }
        }
        call.extensions_mut()
            .insert(GrpcMethod::new(EXPORT_SERVICE, "Export"));
        let answer = match client.ready().await {
            Ok(()) => {
                let path = PathAndQuery::from_static(EXPORT_PATH);
                client.unary(call, path, EncodedCodec).await
            }
            Err(e) => Err(tonic::Status::from_error(Box::new(e))),
        };
        match answer {
            Ok(response) => {
                self.note_partial_success(response.get_ref());
                Ok(())
            }
            Err(status) => Err(failed_export(&status)),
        }
    }

    async fn send_http(&mut self, request: &QueuedRequest) -> Result<(), Attempt> {
        let client = self.http.as_ref().expect("HTTP client for http/protobuf");
        let mut call = client
            .post(&self.settings.endpoint)
            .header("content-type", "application/x-protobuf");
        let body = if self.settings.compression == Compression::Gzip {
            call = call.header("content-encoding", "gzip");
            reqwest::Body::from(request.gzipped.clone())
        } else {
            reqwest::Body::from(request.encoded()?)
        };
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

/// The profiles service, and the path of its Export method.
const EXPORT_SERVICE: &str = "opentelemetry.proto.collector.profiles.v1development.ProfilesService";
const EXPORT_PATH: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// The gRPC codec of an Export call whose request is already encoded: its bytes go out as
/// they are, the response is decoded.
struct EncodedCodec;

impl Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = ExportProfilesServiceResponse;
    type Encoder = EncodedCodec;
    type Decoder = EncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        EncodedCodec
    }
}

impl Encoder for EncodedCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for EncodedCodec {
    type Item = ExportProfilesServiceResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        ExportProfilesServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("cannot decode the response: {e}")))
    }
}

/// What to do after a gRPC export failed with `status`, as the OpenTelemetry Collector's OTLP
/// exporter does: retry CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE,
/// DATA_LOSS and RESOURCE_EXHAUSTED (after the delay of the server's RetryInfo, if it sent
/// one), and a failed connection (a reset or refused connection: tonic reports it as UNKNOWN
/// caused by a transport error); refuse the other codes, which mean the request itself is bad.
fn failed_export(status: &tonic::Status) -> Attempt {
    use tonic::Code::*;
    let mut reason = format!("gRPC {:?}: {}", status.code(), status.message());
    let mut connection_failed = false;
    let mut shown = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        connection_failed |= cause.is::<tonic::transport::Error>() || cause.is::<std::io::Error>();
        let text = cause.to_string();
        if text != shown {
            reason.push_str(": ");
            reason.push_str(&text);
            shown = text;
        }
        source = cause.source();
    }
    match status.code() {
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss
        | ResourceExhausted => Attempt::Retry {
            reason,
            after: retry_delay(status.details()),
        },
        Unknown if connection_failed => Attempt::Retry {
            reason,
            after: None,
        },
        _ => Attempt::Refused(reason),
    }
}

/// The delay of the `google.rpc.RetryInfo` among the `details` of a gRPC status (an encoded
/// `google.rpc.Status`), if the server sent one.
fn retry_delay(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let info = status
        .details
        .iter()
        .find(|any| any.type_url.ends_with("/google.rpc.RetryInfo"))?;
    let delay = RetryInfo::decode(&info.value[..]).ok()?.retry_delay?;
    let seconds = u64::try_from(delay.seconds).ok()?;
    let nanos = u32::try_from(delay.nanos).ok()?;
    Duration::from_secs(seconds).checked_add(Duration::from_nanos(nanos.into()))
}

/// `google.rpc.Status`: the details of a gRPC status (grpc-status-details-bin).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`: how long the server asks the client to wait before retrying.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

#[cfg(test)]
mod tests {
    use std::{io::ErrorKind, sync::Arc, time::Duration};

    use plugin_api::delivery::Attempt;
    use prost::Message;
    use tonic::{codegen::Bytes, Code, Status};

    use super::{failed_export, ProtoAny, ProtoDuration, RetryInfo, RpcStatus};

    fn is_retried(attempt: &Attempt) -> bool {
        matches!(attempt, Attempt::Retry { .. })
    }

    fn reason(attempt: &Attempt) -> &str {
        match attempt {
            Attempt::Retry { reason, .. } | Attempt::Refused(reason) => reason,
            Attempt::Delivered { .. } => "delivered",
        }
    }

    #[test]
    fn the_collectors_retryable_codes_are_retried_and_bad_data_is_refused() {
        use Code::*;
        for code in [
            Cancelled,
            DeadlineExceeded,
            Aborted,
            OutOfRange,
            Unavailable,
            DataLoss,
            ResourceExhausted,
        ] {
            assert!(
                is_retried(&failed_export(&Status::new(code, "x"))),
                "{code:?}"
            );
        }
        for code in [
            InvalidArgument,
            NotFound,
            PermissionDenied,
            Unauthenticated,
            Unimplemented,
            Internal,
            FailedPrecondition,
            Unknown,
        ] {
            assert!(
                !is_retried(&failed_export(&Status::new(code, "x"))),
                "{code:?}"
            );
        }
    }

    #[test]
    fn an_unknown_status_caused_by_the_connection_is_retried() {
        // How tonic reports a reset connection: UNKNOWN, caused by the I/O error.
        let mut status = Status::new(Code::Unknown, "transport error");
        status.set_source(Arc::new(std::io::Error::from(ErrorKind::ConnectionReset)));
        let attempt = failed_export(&status);
        assert!(is_retried(&attempt), "{}", reason(&attempt));
        assert!(
            reason(&attempt).contains("connection reset"),
            "{}",
            reason(&attempt)
        );
    }

    #[test]
    fn retry_info_sets_the_delay() {
        let info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: 2,
                nanos: 500_000_000,
            }),
        };
        let details = RpcStatus {
            details: vec![ProtoAny {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: info.encode_to_vec(),
            }],
        };
        let status = Status::with_details(
            Code::ResourceExhausted,
            "slow down",
            Bytes::from(details.encode_to_vec()),
        );
        match failed_export(&status) {
            Attempt::Retry { after, .. } => assert_eq!(after, Some(Duration::from_millis(2500))),
            other => panic!("not retried: {}", reason(&other)),
        }
    }
}
