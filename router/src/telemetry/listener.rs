//! The HTTP server behind `/metrics` and `/healthz`: one thread of its own running a
//! single-threaded tokio runtime with hyper (HTTP/1), bounded so that whoever can reach the
//! port cannot exhaust the agent or silence the endpoint for good.
//!
//! - At most [`MAX_CONNECTIONS`] connections at a time; one beyond is accepted and closed at
//!   once (counted), so the accept queue never fills with clients nobody will serve.
//! - One request per connection (no keep-alive), its request line and headers within
//!   [`MAX_HEADER_BYTES`] and [`HEADER_TIMEOUT`], the whole request and response within
//!   [`CONNECTION_DEADLINE`].
//! - When `accept` fails for lack of file descriptors or memory (EMFILE, ENFILE, ENOBUFS,
//!   ENOMEM) the listener logs it (at most every [`ACCEPT_ERROR_LOG_EVERY`]), pauses
//!   [`OUT_OF_RESOURCES_PAUSE`] and accepts again: it answers as soon as there are resources.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::Semaphore,
};

use super::{Labels, Telemetry};

/// Connections served at the same time; more are accepted and closed at once.
const MAX_CONNECTIONS: usize = 128;
/// How long a client has to send its request line and headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may take from accept to the end of its response.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The largest request line and headers taken; larger ones are answered 431.
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// The largest read or write buffer of a connection (hyper's minimum is 8 KiB).
const MAX_BUFFER_BYTES: usize = 16 * 1024;
/// Connections the kernel completes and queues before the listener accepts them.
const ACCEPT_BACKLOG: u32 = 1024;
/// The pause after `accept` failed for lack of file descriptors or memory.
const OUT_OF_RESOURCES_PAUSE: Duration = Duration::from_millis(100);
/// At most one log line per this long about failing accepts.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The listener's counters, reported in `/metrics`.
#[derive(Debug)]
pub struct ListenerStats {
    /// One permit per connection being served.
    slots: Arc<Semaphore>,
    /// Connections accepted and closed at once because [`MAX_CONNECTIONS`] were being served.
    refused_connection_limit: AtomicU64,
    /// Failed accepts for lack of file descriptors or memory.
    refused_out_of_resources: AtomicU64,
    /// Connections closed because their headers or their whole exchange took too long.
    timed_out: AtomicU64,
}

impl Default for ListenerStats {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            refused_connection_limit: AtomicU64::default(),
            refused_out_of_resources: AtomicU64::default(),
            timed_out: AtomicU64::default(),
        }
    }
}

impl ListenerStats {
    /// Adds the `router_telemetry_connections_*` metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let open = Gauge::<i64>::default();
        open.set((MAX_CONNECTIONS - self.slots.available_permits()) as i64);
        registry.register(
            "telemetry_connections_open",
            "Connections the telemetry listener is serving",
            open,
        );
        let refused = Family::<Labels, Counter>::default();
        for (reason, value) in [
            ("connection_limit", &self.refused_connection_limit),
            ("out_of_resources", &self.refused_out_of_resources),
        ] {
            refused
                .get_or_create(&vec![("reason".into(), reason.into())])
                .inc_by(value.load(Relaxed));
        }
        registry.register(
            "telemetry_connections_refused",
            "Connections the telemetry listener closed unanswered because it served as many as it takes (connection_limit), or failed accepts for lack of file descriptors or memory (out_of_resources)",
            refused,
        );
        let timed_out = Counter::<u64>::default();
        timed_out.inc_by(self.timed_out.load(Relaxed));
        registry.register(
            "telemetry_connections_timed_out",
            "Telemetry connections closed because the request's headers or the whole exchange took too long",
            timed_out,
        );
    }
}

/// Serves [`route`] on `listen` from a thread of its own.
pub fn serve(listen: SocketAddr, telemetry: Telemetry) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| anyhow::anyhow!("telemetry: cannot start the listener's runtime: {e}"))?;
    let listener = {
        let _inside = runtime.enter();
        bind(listen)
            .map_err(|e| anyhow::anyhow!("telemetry.listen = \"{listen}\": cannot listen: {e}"))?
    };
    tracing::info!(%listen, "serving /metrics and /healthz");
    thread::Builder::new()
        .name("telemetry".into())
        .spawn(move || runtime.block_on(accept_connections(listener, Arc::new(telemetry))))?;
    Ok(())
}

/// The answer to one request: the one place where a path gets its answer.
fn route(telemetry: &Telemetry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain";
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            telemetry.render_metrics(),
        ),
        "/healthz" => match telemetry.unhealthy_reason() {
            None => (StatusCode::OK, TEXT, "ok\n".to_owned()),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("unhealthy: {reason}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics or /healthz\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a known status and a constant header make a valid response")
}

/// A listening socket on `listen` with a deep accept queue.
fn bind(listen: SocketAddr) -> io::Result<TcpListener> {
    let socket = match listen {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Accepts connections for ever, each served on a task of its own while a slot is free.
async fn accept_connections(listener: TcpListener, telemetry: Arc<Telemetry>) {
    let stats = telemetry.listener.clone();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_BUFFER_BYTES)
        // One request per connection: the deadline bounds exactly one exchange, and an idle
        // client holds no slot between scrapes.
        .keep_alive(false);
    let mut accept_errors = AcceptErrorLog::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) if is_out_of_resources(&error) => {
                stats.refused_out_of_resources.fetch_add(1, Relaxed);
                accept_errors.warn(&error);
                tokio::time::sleep(OUT_OF_RESOURCES_PAUSE).await;
                continue;
            }
            // The client went away before the accept (ECONNABORTED) and the like.
            Err(error) => {
                tracing::debug!("telemetry: accept failed: {error}");
                continue;
            }
        };
        let Ok(slot) = stats.slots.clone().try_acquire_owned() else {
            stats.refused_connection_limit.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        };
        let answering = telemetry.clone();
        let service = service_fn(move |request| {
            let response = route(&answering, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let stats = stats.clone();
        tokio::spawn(async move {
            let timed_out = match tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
                Err(_deadline_passed) => true,
                Ok(result) => result.is_err_and(|e| e.is_timeout()),
            };
            if timed_out {
                stats.timed_out.fetch_add(1, Relaxed);
            }
            drop(slot);
        });
    }
}

/// Whether a failed `accept` lacked file descriptors or memory (and may succeed later).
fn is_out_of_resources(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Logs failing accepts at most once per [`ACCEPT_ERROR_LOG_EVERY`], with how many went
/// unlogged in between.
#[derive(Default)]
struct AcceptErrorLog {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrorLog {
    fn warn(&mut self, error: &io::Error) {
        if self
            .last_logged
            .is_some_and(|at| at.elapsed() < ACCEPT_ERROR_LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            unlogged_since_last = self.unlogged,
            "telemetry: cannot accept a connection: {error}; accepting again in {OUT_OF_RESOURCES_PAUSE:?}"
        );
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }
}
