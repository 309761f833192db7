//! Delivery to a backend, for consumers that send what they make over the network: a queue
//! bounded in items and in bytes (beyond either bound the oldest item is dropped, counted and
//! logged, so a backend that is down costs bounded memory) drained by one thread, which
//! retries what may succeed later with exponential backoff and jitter and never retries what
//! the backend refused. A backoff holds until it expires: new items wait behind it; only
//! [`DeliveryQueue::wait_until_drained`] (a flush) and [`DeliveryQueue::stop`] cut it short.
//!
//! ```
//! use plugin_api::delivery::{Attempt, Backoff, DeliveryQueue, QueueLimits, Wording};
//! use std::time::Duration;
//!
//! let backoff = Backoff { first: Duration::from_millis(1), max: Duration::from_millis(10) };
//! let wording = Wording { verb: "send", item: "report" };
//! let limits = QueueLimits { items: 8, bytes: 1 << 20 };
//! let mut queue = DeliveryQueue::new("sender", wording, limits, backoff);
//! queue
//!     .start(|text: &String| Attempt::Delivered { bytes: text.len() as u64 })
//!     .unwrap();
//! queue.push(1, "hello".to_string());
//! assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
//! assert_eq!(queue.stats().delivered_bytes, 5);
//! assert_eq!(queue.health().failed_attempts_in_a_row, 0);
//! assert!(queue.stop(Duration::from_secs(5)).is_ok());
//! ```
//!
//! Creating a queue starts nothing (a configuration check makes one and drops it); `start`
//! starts its thread with what an attempt does (a client built then lives as long as the
//! thread), and `stop` (or dropping the queue) ends it. A panic in an attempt ends the thread;
//! [`DeliveryQueue::health`] then names it, and the router's `/healthz` reports it.

use std::{
    collections::{hash_map::RandomState, VecDeque},
    hash::BuildHasher,
    io,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use abi_stable::std_types::{ROption, RString};

use crate::consumer::{panic_message, Health};

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

/// The bounds of a queue (the item in flight aside): beyond either one, the oldest items are
/// dropped. The newest item is always kept, even when it alone is larger than `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most items waiting (at least one).
    pub items: usize,
    /// Most bytes waiting, as the items report them ([`QueueItem::size_bytes`]).
    pub bytes: u64,
}

impl QueueLimits {
    /// The default byte budget of a queue, 4 MiB: nine network consumers with their backends
    /// down hold 36 MiB at most, within the agent's memory target.
    pub const DEFAULT_BYTES: u64 = 4 << 20;

    /// The byte budget that a plugin's `max_queue_bytes` setting gives: the default when
    /// unset; 1 KiB to 1 GiB, else an error that names the plugin, the key and the value.
    ///
    /// ```
    /// use plugin_api::delivery::QueueLimits;
    /// assert_eq!(QueueLimits::bytes_setting("otlp", None), Ok(QueueLimits::DEFAULT_BYTES));
    /// assert_eq!(
    ///     QueueLimits::bytes_setting("otlp", Some(10)),
    ///     Err("otlp: max_queue_bytes: expected 1KiB to 1GiB, got 10 bytes".to_owned())
    /// );
    /// ```
    pub fn bytes_setting(plugin: &str, max_queue_bytes: Option<u64>) -> Result<u64, String> {
        match max_queue_bytes {
            None => Ok(Self::DEFAULT_BYTES),
            Some(bytes) if (1 << 10..=1 << 30).contains(&bytes) => Ok(bytes),
            Some(bytes) => Err(format!(
                "{plugin}: max_queue_bytes: expected 1KiB to 1GiB, got {bytes} bytes"
            )),
        }
    }
}

/// What a queued item costs in memory, so that a queue keeps to its byte budget.
pub trait QueueItem: Send + 'static {
    /// The bytes the item holds (its payload; small fixed overheads may be left out).
    fn size_bytes(&self) -> u64;
}

impl QueueItem for String {
    fn size_bytes(&self) -> u64 {
        self.len() as u64
    }
}

impl QueueItem for Vec<u8> {
    fn size_bytes(&self) -> u64 {
        self.len() as u64
    }
}

/// Counters of a delivery queue.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Items the backend took.
    pub delivered: u64,
    /// Items dropped because the queue was over one of its limits.
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
    /// Items waiting in the queue (the one in flight aside).
    pub queued: u64,
    /// Bytes of the items waiting in the queue.
    pub queued_bytes: u64,
}

/// An item in the queue, with its number in the log and its size.
struct Queued<T> {
    seq: u64,
    bytes: u64,
    item: T,
}

struct State<T> {
    queue: VecDeque<Queued<T>>,
    queued_bytes: u64,
    in_flight: bool,
    stats: DeliveryStats,
    /// Attempts that failed since the last delivery, and why the last one did.
    failed_in_a_row: u64,
    last_error: Option<String>,
    /// Since when something has waited with nothing delivered meanwhile.
    waiting_since: Option<Instant>,
    /// Bumped by `wait_until_drained`: a backoff that began after the attempt it follows
    /// started ends at once.
    flushes: u64,
    /// Set by `stop`: the thread ends at its next wait.
    stopping: bool,
    /// Set by the thread as it ends.
    stopped: bool,
    /// How the thread died, when an attempt panicked.
    died: Option<String>,
}

impl<T> State<T> {
    /// Whether an item waits or is in flight.
    fn pending(&self) -> bool {
        !self.queue.is_empty() || self.in_flight
    }

    /// Counts a failed attempt.
    fn failed(&mut self, reason: String) {
        self.failed_in_a_row += 1;
        self.last_error = Some(reason);
    }
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled on every change: a new item, a flush that wants an attempt now, an item done.
    changed: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap()
    }
}

/// What one attempt does with an item.
type AttemptFn<T> = Box<dyn FnMut(&T) -> Attempt + Send>;

/// A bounded queue and the thread that delivers its items in order.
pub struct DeliveryQueue<T> {
    shared: Arc<Shared<T>>,
    limits: QueueLimits,
    wording: Wording,
    thread_name: String,
    backoff: Backoff,
    worker: Option<JoinHandle<()>>,
}

impl<T: QueueItem> DeliveryQueue<T> {
    /// A queue within `limits`, delivered by thread `thread_name` once started.
    pub fn new(
        thread_name: &str,
        wording: Wording,
        limits: QueueLimits,
        backoff: Backoff,
    ) -> DeliveryQueue<T> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued_bytes: 0,
                in_flight: false,
                stats: DeliveryStats::default(),
                failed_in_a_row: 0,
                last_error: None,
                waiting_since: None,
                flushes: 0,
                stopping: false,
                stopped: false,
                died: None,
            }),
            changed: Condvar::new(),
        });
        DeliveryQueue {
            shared,
            limits: QueueLimits {
                items: limits.items.max(1),
                ..limits
            },
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
        let thread_name = self.thread_name.clone();
        let attempt: AttemptFn<T> = Box::new(attempt);
        self.worker = Some(crate::log::spawn(&self.thread_name, move || {
            let ended = catch_unwind(AssertUnwindSafe(|| {
                deliver_until_stopped(&shared, wording, backoff, attempt)
            }));
            let mut state = shared.lock();
            if let Err(panic) = ended {
                let death = format!("thread {thread_name} panicked: {}", panic_message(&*panic));
                crate::error!("{death}; nothing more is delivered");
                state.died = Some(death);
                state.in_flight = false;
            }
            state.stopped = true;
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
        let mut state = self.shared.lock();
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

    /// Queues `item` (numbered `seq` in the log); drops the oldest queued items while the
    /// queue is over one of its limits.
    pub fn push(&self, seq: u64, item: T) {
        let bytes = item.size_bytes();
        let mut state = self.shared.lock();
        state.queue.push_back(Queued { seq, bytes, item });
        state.queued_bytes += bytes;
        state.waiting_since.get_or_insert_with(Instant::now);
        let QueueLimits {
            items: max_items,
            bytes: max_bytes,
        } = self.limits;
        while state.queue.len() > 1
            && (state.queue.len() > max_items || state.queued_bytes > max_bytes)
        {
            let Some(oldest) = state.queue.pop_front() else {
                break;
            };
            state.queued_bytes -= oldest.bytes;
            state.stats.dropped += 1;
            let Wording { verb, item } = self.wording;
            crate::warn!(
                "{verb} queue full ({max_items} {item}s or {max_bytes} bytes at most): dropped {item} #{} of {} bytes ({} dropped so far)",
                oldest.seq,
                oldest.bytes,
                state.stats.dropped
            );
        }
        self.shared.changed.notify_all();
    }

    /// Waits until every queued item was delivered or refused, for at most `timeout`; an item
    /// waiting out a backoff is tried once more at once. Returns how many are still pending
    /// (at once when the delivery thread has ended).
    pub fn wait_until_drained(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        state.flushes += 1;
        self.shared.changed.notify_all();
        while state.pending() && !state.stopped {
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
        let state = self.shared.lock();
        DeliveryStats {
            queued: state.queue.len() as u64,
            queued_bytes: state.queued_bytes,
            ..state.stats
        }
    }

    /// How delivery is going, for [`crate::ConsumerPlugin::health`] (add the consumer's own
    /// `problem`, if any).
    pub fn health(&self) -> Health {
        let state = self.shared.lock();
        let text = |s: &Option<String>| ROption::from(s.as_deref().map(RString::from));
        Health {
            problem: ROption::RNone,
            failed_attempts_in_a_row: state.failed_in_a_row,
            last_error: text(&state.last_error),
            undelivered_for_ms: state
                .waiting_since
                .map_or(0, |since| since.elapsed().as_millis() as u64),
            dead_thread: text(&state.died),
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

/// The thread: takes each item in turn and attempts it until delivered or refused; returns
/// when told to stop.
fn deliver_until_stopped<T>(
    shared: &Shared<T>,
    Wording { verb, item }: Wording,
    backoff: Backoff,
    mut attempt: AttemptFn<T>,
) {
    while let Some(Queued {
        seq, item: next, ..
    }) = next_item(shared)
    {
        let mut delay = backoff.first;
        loop {
            let flushes_before = shared.lock().flushes;
            let started = Instant::now();
            let outcome = attempt(&next);
            let mut state = shared.lock();
            match outcome {
                Attempt::Delivered { bytes } => {
                    let micros = started.elapsed().as_micros() as u64;
                    let stats = &mut state.stats;
                    stats.delivered += 1;
                    stats.delivered_bytes += bytes;
                    stats.delivery_micros += micros;
                    stats.last_delivery_micros = micros;
                    state.failed_in_a_row = 0;
                    state.last_error = None;
                    state.waiting_since = (!state.queue.is_empty()).then(Instant::now);
                    break;
                }
                Attempt::Refused(reason) => {
                    crate::error!("failed to {verb} {item} #{seq}: {reason} (not retried)");
                    state.stats.refused += 1;
                    state.failed(reason);
                    if state.queue.is_empty() {
                        state.waiting_since = None;
                    }
                    break;
                }
                Attempt::Retry { reason, after } => {
                    let wait = after
                        .unwrap_or_else(|| delay.mul_f64(jitter()))
                        .min(backoff.max);
                    crate::warn!(
                        "failed to {verb} {item} #{seq}: {reason}; retrying in {wait:.1?}"
                    );
                    state.stats.retries += 1;
                    state.failed(reason);
                    if !wait_out_backoff(shared, state, wait, flushes_before) {
                        shared.lock().in_flight = false;
                        return;
                    }
                    delay = (delay * 2).min(backoff.max);
                }
            }
        }
        shared.lock().in_flight = false;
        shared.changed.notify_all();
    }
}

/// The next item, waiting for one (marked in flight); `None` once told to stop.
fn next_item<T>(shared: &Shared<T>) -> Option<Queued<T>> {
    let mut state = shared.lock();
    loop {
        if state.stopping {
            return None;
        }
        if let Some(next) = state.queue.pop_front() {
            state.queued_bytes -= next.bytes;
            state.in_flight = true;
            return Some(next);
        }
        state = shared.changed.wait(state).unwrap();
    }
}

/// Waits `wait` before the next attempt; new items do not shorten it, a flush requested since
/// the last attempt began does. Returns false when told to stop.
fn wait_out_backoff<T>(
    shared: &Shared<T>,
    mut state: MutexGuard<'_, State<T>>,
    wait: Duration,
    flushes_before: u64,
) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if state.stopping {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if state.flushes != flushes_before || left.is_zero() {
            return true;
        }
        state = shared.changed.wait_timeout(state, left).unwrap().0;
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
    use std::sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc,
    };

    const FAST: Backoff = Backoff {
        first: Duration::from_millis(1),
        max: Duration::from_millis(5),
    };
    const HOUR: Duration = Duration::from_secs(3600);
    const WORDS: Wording = Wording {
        verb: "send",
        item: "item",
    };

    /// Test items weigh their value in bytes.
    impl QueueItem for u64 {
        fn size_bytes(&self) -> u64 {
            *self
        }
    }

    fn items(n: usize) -> QueueLimits {
        QueueLimits {
            items: n,
            bytes: u64::MAX,
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_items_and_counts_them() {
        let (release, gate) = mpsc::channel::<()>();
        let (seen_tx, seen) = mpsc::channel();
        let queue = started(
            DeliveryQueue::new("test-send", WORDS, items(2), FAST),
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
    fn a_queue_over_its_byte_budget_drops_its_oldest_items_but_keeps_the_newest() {
        let limits = QueueLimits {
            items: 100,
            bytes: 10,
        };
        let mut queue = DeliveryQueue::new("test-bytes", WORDS, limits, FAST);
        for seq in 1..=4 {
            queue.push(seq, 4);
        }
        let stats = queue.stats();
        assert_eq!(
            (stats.queued, stats.queued_bytes, stats.dropped),
            (2, 8, 2),
            "two 4-byte items fit in 10 bytes"
        );
        // An item larger than the whole budget pushes out all others and stays alone.
        queue.push(5, 30);
        let stats = queue.stats();
        assert_eq!(
            (stats.queued, stats.queued_bytes, stats.dropped),
            (1, 30, 4)
        );
        let (seen_tx, seen) = mpsc::channel();
        queue
            .start(move |n: &u64| {
                seen_tx.send(*n).unwrap();
                Attempt::Delivered { bytes: *n }
            })
            .unwrap();
        assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
        assert_eq!(seen.try_iter().collect::<Vec<_>>(), [30]);
        assert_eq!(queue.stats().queued_bytes, 0);
    }

    #[test]
    fn a_backoff_holds_while_new_items_arrive_and_a_flush_cuts_it_short() {
        let (attempts_tx, attempts) = mpsc::channel();
        let mut queue = started(
            DeliveryQueue::new(
                "test-backoff",
                WORDS,
                items(100),
                Backoff {
                    first: HOUR,
                    max: HOUR,
                },
            ),
            move |n: &u64| {
                attempts_tx.send(*n).unwrap();
                Attempt::Retry {
                    reason: "503".into(),
                    after: None,
                }
            },
        );
        queue.push(1, 1);
        assert_eq!(attempts.recv().unwrap(), 1);
        for n in 2..=20 {
            queue.push(n, n);
        }
        assert_eq!(
            attempts.recv_timeout(Duration::from_millis(300)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "new items must not cut the backoff short"
        );
        assert_eq!(queue.stats().retries, 1);
        // A flush tries the waiting item once more, at once.
        assert_eq!(queue.wait_until_drained(Duration::from_millis(50)), 20);
        assert_eq!(attempts.recv_timeout(Duration::from_secs(5)), Ok(1));
        // Stopping ends the thread in the middle of a backoff.
        assert_eq!(queue.stop(Duration::from_secs(5)), Ok(()));
    }

    #[test]
    fn retries_until_delivered_but_never_retries_a_refusal() {
        let mut failures = 2;
        let queue = started(
            DeliveryQueue::new("test-send", WORDS, items(8), FAST),
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
    fn health_counts_failures_in_a_row_and_waiting_time_until_a_delivery() {
        let down = Arc::new(AtomicBool::new(true));
        let backend = down.clone();
        let queue = started(
            DeliveryQueue::new("test-health", WORDS, items(8), FAST),
            move |_: &u64| {
                if backend.load(Relaxed) {
                    Attempt::Retry {
                        reason: "connection refused".into(),
                        after: None,
                    }
                } else {
                    Attempt::Delivered { bytes: 1 }
                }
            },
        );
        assert_eq!(queue.health(), Health::default(), "nothing to deliver yet");
        queue.push(1, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue.health().failed_attempts_in_a_row < 3 {
            assert!(Instant::now() < deadline, "{:?}", queue.health());
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(2));
        let failing = queue.health();
        assert_eq!(
            failing.last_error,
            ROption::RSome("connection refused".into())
        );
        assert!(failing.undelivered_for_ms >= 2, "{failing:?}");
        down.store(false, Relaxed);
        assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
        assert_eq!(queue.health(), Health::default(), "healthy again");
    }

    #[test]
    fn a_panicking_attempt_ends_the_thread_and_health_names_it() {
        let mut queue = started(
            DeliveryQueue::new("test-panics", WORDS, items(8), FAST),
            |_: &u64| panic!("malformed item"),
        );
        queue.push(1, 1);
        queue.push(2, 2);
        assert_eq!(
            queue.wait_until_drained(Duration::from_secs(5)),
            1,
            "the thread is gone: item 2 waits for nothing"
        );
        assert_eq!(
            queue.health().dead_thread,
            ROption::RSome("thread test-panics panicked: malformed item".into())
        );
        assert_eq!(queue.stop(Duration::from_secs(5)), Ok(()));
    }

    #[test]
    fn waiting_for_an_unreachable_backend_ends_with_what_is_pending() {
        let mut queue = started(
            DeliveryQueue::new("test-send", WORDS, items(8), FAST),
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
        let mut queue = DeliveryQueue::new("test-idle", WORDS, items(8), FAST);
        queue.push(1, 1);
        assert_eq!(queue.stats().queued, 1, "queued, not sent: no thread");
        queue
            .start(|_: &u64| Attempt::Delivered { bytes: 0 })
            .unwrap();
        assert_eq!(queue.wait_until_drained(Duration::from_secs(5)), 0);
        assert_eq!(queue.stop(Duration::from_secs(5)), Ok(()));
        assert!(queue.shared.lock().stopped);
    }

    fn started<T: QueueItem>(
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
