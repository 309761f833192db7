//! Delivery to a backend, for consumers that send what they make over the network: a bounded
//! queue (the oldest item is dropped, counted and logged when it is full, so a backend that is
//! down costs bounded memory) drained by one thread, which retries what may succeed later with
//! exponential backoff and jitter and never retries what the backend refused.
//!
//! ```
//! use plugin_api::delivery::{Attempt, Backoff, DeliveryQueue, Wording};
//! use std::time::Duration;
//!
//! let backoff = Backoff { first: Duration::from_millis(1), max: Duration::from_millis(10) };
//! let wording = Wording { verb: "send", item: "report" };
//! let mut queue = DeliveryQueue::new("sender", wording, 8, backoff);
//! queue
//!     .start(|text: &String| Attempt::Delivered { bytes: text.len() as u64 })
//!     .unwrap();
//! queue.push(1, "hello".to_string());
//! assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
//! assert_eq!(queue.stats().delivered_bytes, 5);
//! assert!(queue.stop(Duration::from_secs(5)).is_ok());
//! ```
//!
//! Creating a queue starts nothing (a configuration check makes one and drops it); `start`
//! starts its thread with what an attempt does (a client built then lives as long as the
//! thread), and `stop` (or dropping the queue) ends it.

use std::{
    collections::{hash_map::RandomState, VecDeque},
    hash::BuildHasher,
    io,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How one attempt to deliver an item ended.
pub enum Attempt {
    /// The backend took it.
    Delivered {
        /// Bytes delivered, for the counters.
        bytes: u64,
    },
    /// It may succeed later (connection error, 5xx, UNAVAILABLE): try again after a backoff.
    Retry {
        /// What went wrong, for the log.
        reason: String,
        /// The backend's own delay (Retry-After), used instead of the backoff when given.
        after: Option<Duration>,
    },
    /// The backend refused it (4xx): retrying would not help.
    Refused(String),
}

/// Delays between attempts: `first`, doubled after every failure up to `max`, each one
/// scaled by a random factor between 0.5 and 1.5.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
}

/// The words the log uses: "failed to {verb} {item} #7: ...".
#[derive(Debug, Clone, Copy)]
pub struct Wording {
    /// What the queue does with an item ("upload").
    pub verb: &'static str,
    /// What an item is ("profile").
    pub item: &'static str,
}

/// Counters of a delivery queue.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Items the backend took.
    pub delivered: u64,
    /// Items dropped because the queue was full.
    pub dropped: u64,
    /// Items the backend refused (not retried).
    pub refused: u64,
    /// Attempts that failed and were retried.
    pub retries: u64,
    /// Bytes the backend took.
    pub delivered_bytes: u64,
    /// Time spent in successful attempts, microseconds.
    pub delivery_micros: u64,
    /// Duration of the last successful attempt, microseconds.
    pub last_delivery_micros: u64,
    /// Items waiting in the queue.
    pub queued: u64,
}

struct State<T> {
    queue: VecDeque<(u64, T)>,
    in_flight: bool,
    stats: DeliveryStats,
    /// Set by `stop`: the thread ends at its next wait.
    stopping: bool,
    /// Set by the thread as it ends.
    stopped: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled on every change: a new item, a flush that wants an attempt now, an item done.
    changed: Condvar,
}

/// What one attempt does with an item.
type AttemptFn<T> = Box<dyn FnMut(&T) -> Attempt + Send>;

/// A bounded queue and the thread that delivers its items in order.
pub struct DeliveryQueue<T> {
    shared: Arc<Shared<T>>,
    capacity: usize,
    wording: Wording,
    thread_name: String,
    backoff: Backoff,
    worker: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> DeliveryQueue<T> {
    /// A queue of `capacity` items at most (at least one), delivered by thread `thread_name`
    /// once started.
    pub fn new(
        thread_name: &str,
        wording: Wording,
        capacity: usize,
        backoff: Backoff,
    ) -> DeliveryQueue<T> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                in_flight: false,
                stats: DeliveryStats::default(),
                stopping: false,
                stopped: false,
            }),
            changed: Condvar::new(),
        });
        DeliveryQueue {
            shared,
            capacity: capacity.max(1),
            wording,
            thread_name: thread_name.to_owned(),
            backoff,
            worker: None,
        }
    }

    /// Starts the delivery thread, which hands every queued item to `attempt` until it is
    /// delivered or refused (once; a queue already started keeps its thread).
    pub fn start(&mut self, attempt: impl FnMut(&T) -> Attempt + Send + 'static) -> io::Result<()> {
        if self.worker.is_some() {
            return Ok(());
        }
        let (shared, wording, backoff) = (self.shared.clone(), self.wording, self.backoff);
        let attempt: AttemptFn<T> = Box::new(attempt);
        self.worker = Some(crate::log::spawn(&self.thread_name, move || {
            deliver_until_stopped(&shared, wording, backoff, attempt);
            shared.state.lock().unwrap().stopped = true;
            shared.changed.notify_all();
        })?);
        Ok(())
    }

    /// Ends the delivery thread, waiting `timeout` at most for an attempt in flight; what is
    /// still queued stays undelivered. An error says the thread was still busy.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(worker) = self.worker.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().unwrap();
        state.stopping = true;
        self.shared.changed.notify_all();
        while !state.stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "thread {} still busy after {timeout:?}",
                    self.thread_name
                ));
            }
            state = self.shared.changed.wait_timeout(state, left).unwrap().0;
        }
        drop(state);
        let _ = worker.join();
        Ok(())
    }

    /// Queues `item` (numbered `seq` in the log); drops the oldest queued item when full.
    pub fn push(&self, seq: u64, item: T) {
        let mut state = self.shared.state.lock().unwrap();
        if state.queue.len() >= self.capacity {
            if let Some((old, _)) = state.queue.pop_front() {
                state.stats.dropped += 1;
                let Wording { verb, item } = self.wording;
                crate::warn!(
                    "{verb} queue full ({} {item}s): dropped {item} #{old} ({} dropped so far)",
                    self.capacity,
                    state.stats.dropped
                );
            }
        }
        state.queue.push_back((seq, item));
        self.shared.changed.notify_all();
    }

    /// Waits until every queued item was delivered or refused, for at most `timeout`; an item
    /// waiting out a backoff is tried once more at once. Returns how many are still pending.
    pub fn wait_until_drained(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().unwrap();
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

    /// The counters.
    pub fn stats(&self) -> DeliveryStats {
        let state = self.shared.state.lock().unwrap();
        DeliveryStats {
            queued: state.queue.len() as u64,
            ..state.stats
        }
    }
}

impl<T> Drop for DeliveryQueue<T> {
    /// Tells the thread to end, without waiting for it.
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stopping = true;
        self.shared.changed.notify_all();
    }
}

fn deliver_until_stopped<T>(
    shared: &Shared<T>,
    Wording { verb, item }: Wording,
    backoff: Backoff,
    mut attempt: AttemptFn<T>,
) {
    loop {
        let (seq, next) = {
            let mut state = shared.state.lock().unwrap();
            loop {
                if state.stopping {
                    return;
                }
                if let Some(next) = state.queue.pop_front() {
                    state.in_flight = true;
                    break next;
                }
                state = shared.changed.wait(state).unwrap();
            }
        };
        let mut delay = backoff.first;
        loop {
            let started = Instant::now();
            match attempt(&next) {
                Attempt::Delivered { bytes } => {
                    let micros = started.elapsed().as_micros() as u64;
                    let stats = &mut shared.state.lock().unwrap().stats;
                    stats.delivered += 1;
                    stats.delivered_bytes += bytes;
                    stats.delivery_micros += micros;
                    stats.last_delivery_micros = micros;
                    break;
                }
                Attempt::Refused(reason) => {
                    crate::error!("failed to {verb} {item} #{seq}: {reason} (not retried)");
                    shared.state.lock().unwrap().stats.refused += 1;
                    break;
                }
                Attempt::Retry { reason, after } => {
                    let wait = after
                        .unwrap_or_else(|| delay.mul_f64(jitter()))
                        .min(backoff.max);
                    crate::warn!(
                        "failed to {verb} {item} #{seq}: {reason}; retrying in {wait:.1?}"
                    );
                    let mut state = shared.state.lock().unwrap();
                    state.stats.retries += 1;
                    // A new item or a flush cuts the wait short.
                    let (mut state, _) = shared.changed.wait_timeout(state, wait).unwrap();
                    if state.stopping {
                        state.in_flight = false;
                        return;
                    }
                    delay = (delay * 2).min(backoff.max);
                }
            }
        }
        shared.state.lock().unwrap().in_flight = false;
        shared.changed.notify_all();
    }
}

/// A random factor in [0.5, 1.5): std's randomly keyed hasher is random enough to spread
/// retries out, without a dependency for it.
fn jitter() -> f64 {
    let bits = RandomState::new().hash_one(Instant::now());
    0.5 + (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const FAST: Backoff = Backoff {
        first: Duration::from_millis(1),
        max: Duration::from_millis(5),
    };
    const WORDS: Wording = Wording {
        verb: "send",
        item: "item",
    };

    #[test]
    fn a_full_queue_drops_its_oldest_items_and_counts_them() {
        let (release, gate) = mpsc::channel::<()>();
        let (seen_tx, seen) = mpsc::channel();
        let queue = started(
            DeliveryQueue::new("test-send", WORDS, 2, FAST),
            move |n: &u64| {
                seen_tx.send(*n).unwrap();
                gate.recv().unwrap();
                Attempt::Delivered { bytes: 1 }
            },
        );
        queue.push(1, 1);
        // Item 1 is in flight; 2 and 3 fill the queue; 4 and 5 push out 2 and 3.
        assert_eq!(seen.recv().unwrap(), 1);
        for n in 2..=5 {
            queue.push(n, n);
        }
        assert_eq!(queue.stats().dropped, 2);
        assert_eq!(queue.stats().queued, 2);
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
        assert_eq!(seen.try_iter().collect::<Vec<_>>(), [4, 5]);
        assert_eq!(queue.stats().delivered, 3);
    }

    #[test]
    fn retries_until_delivered_but_never_retries_a_refusal() {
        let mut failures = 2;
        let queue = started(
            DeliveryQueue::new("test-send", WORDS, 8, FAST),
            move |n: &u64| {
                if *n == 0 {
                    Attempt::Refused("no".into())
                } else if failures > 0 {
                    failures -= 1;
                    Attempt::Retry {
                        reason: "later".into(),
                        after: None,
                    }
                } else {
                    Attempt::Delivered { bytes: *n }
                }
            },
        );
        queue.push(1, 0);
        queue.push(2, 7);
        assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
        let stats = queue.stats();
        assert_eq!(
            (
                stats.delivered,
                stats.refused,
                stats.retries,
                stats.delivered_bytes
            ),
            (1, 1, 2, 7)
        );
    }

    #[test]
    fn waiting_for_an_unreachable_backend_ends_with_what_is_pending() {
        let mut queue = started(
            DeliveryQueue::new("test-send", WORDS, 8, FAST),
            |_: &u64| Attempt::Retry {
                reason: "down".into(),
                after: Some(Duration::from_millis(2)),
            },
        );
        queue.push(1, 1);
        queue.push(2, 2);
        assert_eq!(queue.wait_until_drained(Duration::from_millis(50)), 2);
        assert!(queue.stats().retries >= 2);
        // Stopping ends the thread even while it retries.
        assert_eq!(queue.stop(Duration::from_secs(5)), Ok(()));
    }

    #[test]
    fn a_queue_sends_nothing_until_started_and_its_thread_ends_at_stop() {
        let mut queue = DeliveryQueue::new("test-idle", WORDS, 8, FAST);
        queue.push(1, 1);
        assert_eq!(queue.stats().queued, 1, "queued, not sent: no thread");
        queue
            .start(|_: &u64| Attempt::Delivered { bytes: 0 })
            .unwrap();
        assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
        assert_eq!(queue.stop(Duration::from_secs(5)), Ok(()));
        assert!(queue.shared.state.lock().unwrap().stopped);
    }

    fn started<T: Send + 'static>(
        mut queue: DeliveryQueue<T>,
        attempt: impl FnMut(&T) -> Attempt + Send + 'static,
    ) -> DeliveryQueue<T> {
        queue.start(attempt).unwrap();
        queue
    }

    #[test]
    fn jitter_stays_between_half_and_one_and_a_half() {
        let factors: Vec<f64> = (0..1000).map(|_| jitter()).collect();
        assert!(factors.iter().all(|f| (0.5..1.5).contains(f)));
        let mean = factors.iter().sum::<f64>() / factors.len() as f64;
        assert!((0.9..1.1).contains(&mean), "mean {mean}");
    }
}
