//! The transport: a bounded queue of compressed profiles (drop-oldest, counted) and one thread
//! that uploads them, retrying connection errors and 5xx with exponential backoff and jitter,
//! never 4xx.

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use rand::Rng;
use reqwest::blocking::{multipart, Client};

use crate::{
    config::{Destination, Settings},
    event::{ATTACHMENT, PROFILER_NAME, PROFILER_VERSION},
};

/// One profile ready to upload.
pub struct Upload {
    /// The event.json text.
    pub event: String,
    /// The compressed pprof.
    pub pprof: Vec<u8>,
    /// How many batches it merges.
    pub batches: usize,
    /// Its sequence number.
    pub seq: u64,
}

/// Counters of the transport.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    /// Profiles accepted by the backend.
    pub uploaded: u64,
    /// Profiles dropped because the queue was full.
    pub dropped: u64,
    /// Profiles refused with a 4xx (not retried).
    pub rejected: u64,
    /// Attempts that failed and were retried.
    pub retries: u64,
    /// Compressed pprof bytes accepted by the backend.
    pub uploaded_bytes: u64,
    /// Time spent in successful uploads, microseconds.
    pub upload_micros: u64,
    /// Duration of the last successful upload, microseconds.
    pub last_upload_micros: u64,
    /// Profiles waiting in the queue.
    pub queued: u64,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Upload>,
    in_flight: bool,
    stats: ExportStats,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The uploading side of the consumer.
pub struct Exporter {
    shared: Arc<Shared>,
    max_queue: usize,
}

enum Outcome {
    Done,
    Retry(String),
    Reject(String),
}

impl Exporter {
    /// Starts the upload thread.
    pub fn start(settings: &Settings) -> Result<Exporter, String> {
        let client = Client::builder()
            .timeout(settings.timeout)
            .user_agent(format!("{PROFILER_NAME}/{PROFILER_VERSION}"))
            .build()
            .map_err(|e| format!("datadog: cannot build the HTTP client: {e}"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let worker = shared.clone();
        let worker_settings = settings.clone();
        thread::Builder::new()
            .name("datadog-upload".into())
            .spawn(move || upload_forever(&worker, &client, &worker_settings))
            .map_err(|e| format!("datadog: cannot start the upload thread: {e}"))?;
        Ok(Exporter {
            shared,
            max_queue: settings.max_queue,
        })
    }

    /// Queues `upload`; drops (and counts) the oldest queued profile when the queue is full.
    pub fn enqueue(&self, upload: Upload) {
        let mut state = self.shared.state.lock().unwrap();
        if state.queue.len() >= self.max_queue {
            if let Some(old) = state.queue.pop_front() {
                state.stats.dropped += 1;
                plugin_api::warn!(
                    "upload queue full ({} profiles): dropped profile #{} ({} dropped so far)",
                    self.max_queue,
                    old.seq,
                    state.stats.dropped
                );
            }
        }
        state.queue.push_back(upload);
        self.shared.changed.notify_all();
    }

    /// Waits until every queued profile was uploaded (or refused), for at most `timeout`;
    /// returns how many are still pending.
    pub fn wait_until_drained(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().unwrap();
        // Wakes a sender sleeping out a backoff: one attempt now.
        self.shared.changed.notify_all();
        while !state.queue.is_empty() || state.in_flight {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.shared.changed.wait_timeout(state, left).unwrap().0;
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

fn upload_forever(shared: &Shared, client: &Client, settings: &Settings) {
    loop {
        let upload = {
            let mut state = shared.state.lock().unwrap();
            loop {
                if let Some(upload) = state.queue.pop_front() {
                    state.in_flight = true;
                    break upload;
                }
                state = shared.changed.wait(state).unwrap();
            }
        };
        let mut backoff = settings.retry_backoff;
        loop {
            let started = Instant::now();
            match send(client, settings, &upload) {
                Outcome::Done => {
                    let micros = started.elapsed().as_micros() as u64;
                    let mut state = shared.state.lock().unwrap();
                    state.stats.uploaded += 1;
                    state.stats.uploaded_bytes += upload.pprof.len() as u64;
                    state.stats.upload_micros += micros;
                    state.stats.last_upload_micros = micros;
                    break;
                }
                Outcome::Reject(reason) => {
                    plugin_api::error!(
                        "failed to upload profile #{}: {reason} (not retried)",
                        upload.seq
                    );
                    shared.state.lock().unwrap().stats.rejected += 1;
                    break;
                }
                Outcome::Retry(reason) => {
                    let jitter = rand::rng().random_range(0.5..1.5);
                    let wait = backoff.mul_f64(jitter).min(settings.retry_max_backoff);
                    plugin_api::warn!(
                        "failed to upload profile #{}: {reason}; retrying in {wait:.1?}",
                        upload.seq
                    );
                    let mut state = shared.state.lock().unwrap();
                    state.stats.retries += 1;
                    // A new profile or a flush wakes it early.
                    drop(shared.changed.wait_timeout(state, wait).unwrap());
                    backoff = (backoff * 2).min(settings.retry_max_backoff);
                }
            }
        }
        shared.state.lock().unwrap().in_flight = false;
        shared.changed.notify_all();
    }
}

fn send(client: &Client, settings: &Settings, upload: &Upload) -> Outcome {
    let form = multipart::Form::new()
        .part(
            "event",
            multipart::Part::text(upload.event.clone())
                .file_name("event.json")
                .mime_str("application/json")
                .expect("valid mime"),
        )
        .part(
            ATTACHMENT,
            multipart::Part::bytes(upload.pprof.clone())
                .file_name(ATTACHMENT)
                .mime_str("application/octet-stream")
                .expect("valid mime"),
        );
    let mut request = client
        .post(settings.destination.url())
        .header("DD-EVP-ORIGIN", PROFILER_NAME)
        .header("DD-EVP-ORIGIN-VERSION", PROFILER_VERSION)
        .multipart(form);
    if let Destination::Agentless { api_key, .. } = &settings.destination {
        request = request.header("DD-API-KEY", api_key);
    }
    plugin_api::info!(
        "uploading profiles to Datadog: profile #{} batch_size={} bytes={} to {}",
        upload.seq,
        upload.batches,
        upload.pprof.len(),
        settings.destination.url()
    );
    match request.send() {
        Ok(response) => {
            let status = response.status();
            if status.is_success() {
                Outcome::Done
            } else if status.as_u16() == 404 {
                Outcome::Reject(format!(
                    "{} answered 404: no profiling endpoint there (a Datadog Agent older than 7.20, or the wrong URL)",
                    settings.destination.url()
                ))
            } else {
                let body = response.text().unwrap_or_default();
                let body: String = body.chars().take(500).collect();
                let reason = format!("HTTP {status}: {body}");
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    Outcome::Retry(reason)
                } else {
                    Outcome::Reject(reason)
                }
            }
        }
        Err(e) => Outcome::Retry(describe_error(&e)),
    }
}

/// reqwest's error with its causes, without the URL's secrets (there are none in the URL).
fn describe_error(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
