//! The transport: profiles go through a [`DeliveryQueue`] (bounded, drop-oldest, counted) to
//! one thread that uploads them, retrying connection errors, 5xx, 408 and 429 with backoff and
//! jitter, never the other 4xx.

use plugin_api::delivery::{Attempt, Backoff, DeliveryQueue, QueueItem, QueueLimits, Wording};
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
    /// The one container all its processes run in, if they share one: the Datadog Agent
    /// tags the profile with that container's (and pod's) metadata.
    pub container_id: Option<String>,
}

impl QueueItem for Upload {
    fn size_bytes(&self) -> u64 {
        (self.event.len() + self.pprof.len() + self.container_id.as_ref().map_or(0, String::len))
            as u64
    }
}

/// The HTTP client uploads (and the Agent check) go through.
pub fn client(settings: &Settings) -> Result<Client, String> {
    Client::builder()
        .timeout(settings.timeout)
        .user_agent(format!("{PROFILER_NAME}/{PROFILER_VERSION}"))
        .build()
        .map_err(|e| format!("datadog: cannot build the HTTP client: {e}"))
}

/// The upload queue (started by [`start`]).
pub fn queue(settings: &Settings) -> DeliveryQueue<Upload> {
    let backoff = Backoff {
        first: settings.retry_backoff,
        max: settings.retry_max_backoff,
    };
    let wording = Wording {
        verb: "upload",
        item: "profile",
    };
    let limits = QueueLimits {
        items: settings.max_queue,
        bytes: settings.max_queue_bytes,
    };
    DeliveryQueue::new("datadog-upload", wording, limits, backoff)
}

/// Starts the upload thread, which uploads the profiles pushed to `queue` in order with
/// `client` (which lives as long as the thread).
pub fn start(
    queue: &mut DeliveryQueue<Upload>,
    settings: &Settings,
    client: Client,
) -> Result<(), String> {
    let settings = settings.clone();
    queue
        .start(move |upload: &Upload| send(&client, &settings, upload))
        .map_err(|e| format!("datadog: cannot start the upload thread: {e}"))
}

fn send(client: &Client, settings: &Settings, upload: &Upload) -> Attempt {
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
    if let Some(id) = &upload.container_id {
        request = request
            .header("Datadog-Container-ID", id)
            .header("Datadog-Entity-ID", format!("ci-{id}"));
    }
    plugin_api::info!(
        "uploading profiles to Datadog: profile #{} batch_size={} bytes={} to {}",
        upload.seq,
        upload.batches,
        upload.pprof.len(),
        settings.destination.shown_url()
    );
    match request.send() {
        Ok(response) => {
            let status = response.status();
            if status.is_success() {
                Attempt::Delivered {
                    bytes: upload.pprof.len() as u64,
                }
            } else if status.as_u16() == 404 {
                Attempt::Refused(format!(
                    "{} answered 404: no profiling endpoint there (a Datadog Agent older than 7.20, or the wrong URL)",
                    settings.destination.shown_url()
                ))
            } else {
                let body = response.text().unwrap_or_default();
                let body: String = body.chars().take(500).collect();
                let reason = format!("HTTP {status}: {body}");
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    Attempt::Retry {
                        reason,
                        after: None,
                    }
                } else {
                    Attempt::Refused(reason)
                }
            }
        }
        Err(e) => Attempt::Retry {
            reason: describe_error(&e),
            after: None,
        },
    }
}

/// reqwest's error with its causes, without its URL (which may hold a password).
pub fn describe_error(e: &reqwest::Error) -> String {
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
