//! The pub/sub bus: one bounded drop-oldest queue and one thread per consumer, so a slow or
//! failing consumer never delays the others or the producer.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Condvar, Mutex, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::RResult;
use plugin_api::{Health, PluginMetric, ProfileBatch};

use crate::{plugin_host::LoadedConsumer, shutdown::StopSignal};

/// A bounded FIFO that, when full, drops its oldest item to make room for a new one.
pub struct DropOldestQueue<T> {
    state: Mutex<QueueState<T>>,
    ready: Condvar,
    capacity: usize,
}

struct QueueState<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> DropOldestQueue<T> {
    /// A queue that holds at most `capacity` items (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds `item`; returns the oldest item when it had to be dropped to make room.
    pub fn push(&self, item: T) -> Option<T> {
        let mut state = self.state.lock().unwrap();
        let dropped = (state.items.len() >= self.capacity)
            .then(|| state.items.pop_front())
            .flatten();
        state.items.push_back(item);
        self.ready.notify_one();
        dropped
    }

    /// The oldest item, waiting `timeout` at most for one.
    pub fn pop_within(&self, timeout: Duration) -> Popped<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Popped::Item(item);
            }
            if state.closed {
                return Popped::Closed;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Popped::TimedOut;
            }
            state = self.ready.wait_timeout(state, left).unwrap().0;
        }
    }

    /// No more pushes: `pop_within` returns what is left, then [`Popped::Closed`].
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.ready.notify_all();
    }

    /// Number of items waiting.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().items.len()
    }

    /// Whether no item is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What waiting for an item of a [`DropOldestQueue`] gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped<T> {
    /// The oldest item.
    Item(T),
    /// None came in time.
    TimedOut,
    /// The queue is closed and empty.
    Closed,
}

/// A consumer's [`Health`] as it reported it, and when.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// What the consumer said.
    pub health: Health,
    /// When it said it.
    pub taken: Instant,
}

/// Counters of one consumer's deliveries.
#[derive(Default, Debug)]
pub struct ConsumerStats {
    /// Batches published to this consumer.
    pub received: AtomicU64,
    /// Batches the consumer took without error.
    pub delivered: AtomicU64,
    /// Batches dropped because its queue was full.
    pub dropped: AtomicU64,
    /// The router's calls into the consumer (`consume`, `flush`, `shutdown`) that returned an
    /// error or panicked; a plugin's own delivery attempts are its own counters.
    pub failed: AtomicU64,
    /// The last error, if any.
    pub last_error: Mutex<Option<String>>,
    /// Batches waiting in the queue.
    pub queued: AtomicU64,
    /// Whether the most recent call failed (the consumer is then unhealthy).
    pub last_call_failed: AtomicBool,
    /// Whether the consumer's thread has finished.
    pub finished: AtomicBool,
    /// The plugin's own numbers, as of its last call.
    pub plugin_metrics: Mutex<Vec<PluginMetric>>,
    /// How the plugin's deliveries are going, as it said after its last call.
    pub plugin_health: Mutex<Option<HealthReport>>,
    /// The call into the consumer under way (`consume`, `flush`, `shutdown`) and since when.
    pub call_in_progress: Mutex<Option<(&'static str, Instant)>>,
}

impl ConsumerStats {
    fn fail(&self, consumer: &str, call: &str, error: &str) {
        self.failed.fetch_add(1, Relaxed);
        self.last_call_failed.store(true, Relaxed);
        *self.last_error.lock().unwrap() = Some(error.to_owned());
        tracing::error!(consumer, call, error, "consumer call failed");
    }

    /// Runs `call`, the consumer's `what`, noting meanwhile that it is under way.
    fn in_call<T>(&self, what: &'static str, call: impl FnOnce() -> T) -> T {
        *self.call_in_progress.lock().unwrap() = Some((what, Instant::now()));
        let result = call();
        *self.call_in_progress.lock().unwrap() = None;
        result
    }

    /// One line for the log: `received=… delivered=… dropped=… failed=…`.
    pub fn summary(&self) -> String {
        format!(
            "received={} delivered={} dropped={} failed={}",
            self.received.load(Relaxed),
            self.delivered.load(Relaxed),
            self.dropped.load(Relaxed),
            self.failed.load(Relaxed)
        )
    }
}

struct Subscriber {
    name: String,
    queue: Arc<DropOldestQueue<Arc<ProfileBatch>>>,
    stats: Arc<ConsumerStats>,
    /// Triggered once the consumer's thread has flushed and shut the consumer down.
    done: StopSignal,
}

impl Subscriber {
    /// Starts `consumer`'s thread behind a queue of `capacity` batches. With `after`, the
    /// thread takes its first batch only once that instance is done (or `flush_timeout` has
    /// passed): a reloaded consumer's old instance delivers and flushes first.
    fn spawn(
        consumer: LoadedConsumer,
        capacity: usize,
        stats: Arc<ConsumerStats>,
        flush_timeout: Duration,
        after: Option<StopSignal>,
    ) -> Subscriber {
        let subscriber = Subscriber {
            name: consumer.name.clone(),
            queue: Arc::new(DropOldestQueue::new(capacity)),
            stats,
            done: StopSignal::new(),
        };
        let queue = subscriber.queue.clone();
        let stats = subscriber.stats.clone();
        let done = subscriber.done.clone();
        thread::Builder::new()
            .name(format!("consumer-{}", consumer.name))
            .spawn(move || {
                if let Some(previous) = after {
                    if !previous.wait(flush_timeout) {
                        tracing::warn!(
                            consumer = %consumer.name,
                            "the previous instance is still finishing; the new one starts anyway"
                        );
                    }
                    stats.finished.store(false, Relaxed);
                }
                deliver_until_closed(consumer, &queue, &stats, flush_timeout);
                done.trigger();
            })
            .expect("spawn consumer thread");
        subscriber
    }
}

/// Fans every published batch out to every consumer; consumers can be swapped while it runs.
pub struct Bus {
    subscribers: RwLock<Vec<Subscriber>>,
    flush_timeout: Duration,
}

impl Bus {
    /// Starts one thread per consumer, each behind a queue of `capacity` batches. Once its
    /// queue is closed and drained, a consumer gets `flush_timeout` to flush and shut down.
    pub fn start(consumers: Vec<(LoadedConsumer, usize)>, flush_timeout: Duration) -> Bus {
        let subscribers = consumers
            .into_iter()
            .map(|(consumer, capacity)| {
                Subscriber::spawn(consumer, capacity, Arc::default(), flush_timeout, None)
            })
            .collect();
        Bus {
            subscribers: RwLock::new(subscribers),
            flush_timeout,
        }
    }

    /// Hands `batch` to every consumer without waiting for any of them; one shared copy.
    pub fn publish(&self, batch: ProfileBatch) {
        let batch = Arc::new(batch);
        for s in self.subscribers.read().unwrap().iter() {
            s.stats.received.fetch_add(1, Relaxed);
            let dropped_oldest = s.queue.push(batch.clone()).is_some();
            s.stats.queued.store(s.queue.len() as u64, Relaxed);
            if dropped_oldest {
                let dropped = s.stats.dropped.fetch_add(1, Relaxed) + 1;
                tracing::warn!(
                    consumer = %s.name,
                    dropped,
                    "consumer queue full: dropped its oldest batch"
                );
            }
        }
    }

    /// The counters of every consumer, by name.
    pub fn stats(&self) -> Vec<(String, Arc<ConsumerStats>)> {
        self.subscribers
            .read()
            .unwrap()
            .iter()
            .map(|s| (s.name.clone(), s.stats.clone()))
            .collect()
    }

    /// The names of the consumers subscribed.
    pub fn consumer_names(&self) -> Vec<String> {
        self.subscribers
            .read()
            .unwrap()
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    /// Puts `replacement` in the place of consumer `name` (adds it when there is none; with
    /// `None`, removes `name`). The old instance takes what was queued, flushes and shuts down;
    /// the new one receives every batch published from now on and starts delivering once the
    /// old one is done. Waits for the old one for at most the flush timeout; returns whether
    /// it finished.
    pub fn swap(&self, name: &str, replacement: Option<(LoadedConsumer, usize)>) -> bool {
        let mut subscribers = self.subscribers.write().unwrap();
        let position = subscribers.iter().position(|s| s.name == name);
        let old = position.map(|i| subscribers.remove(i));
        if let Some(old) = &old {
            old.queue.close();
        }
        if let Some((consumer, capacity)) = replacement {
            let stats = old.as_ref().map_or_else(Arc::default, |o| o.stats.clone());
            let after = old.as_ref().map(|o| o.done.clone());
            let new = Subscriber::spawn(consumer, capacity, stats, self.flush_timeout, after);
            let at = position.unwrap_or(subscribers.len());
            subscribers.insert(at, new);
        }
        drop(subscribers);
        old.is_none_or(|old| finish(&old, self.flush_timeout))
    }

    /// Closes every queue and waits until each consumer has taken what was queued, flushed and
    /// shut down, for at most `timeout`. Returns the names of the consumers that did not finish.
    pub fn shutdown(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let subscribers = std::mem::take(&mut *self.subscribers.write().unwrap());
        for s in &subscribers {
            s.queue.close();
        }
        subscribers
            .iter()
            .filter(|s| !finish(s, deadline.saturating_duration_since(Instant::now())))
            .map(|s| s.name.clone())
            .collect()
    }
}

/// Waits (at most `timeout`) for a closed subscriber to finish and logs how it ended.
fn finish(subscriber: &Subscriber, timeout: Duration) -> bool {
    let finished = subscriber.done.wait(timeout);
    let name = &subscriber.name;
    if finished {
        tracing::info!(consumer = %name, "consumer stopped: {}", subscriber.stats.summary());
    } else {
        tracing::error!(
            consumer = %name,
            ?timeout,
            "consumer did not finish within the shutdown timeout: {}",
            subscriber.stats.summary()
        );
    }
    finished
}

/// How often an idle consumer is asked for its health and metrics (it is asked after every
/// call too), so that `/healthz` follows its background deliveries.
const HEALTH_REFRESH: Duration = Duration::from_secs(1);

/// The consumer thread: deliver each batch, then flush and shut down once the queue closes.
fn deliver_until_closed(
    mut consumer: LoadedConsumer,
    queue: &DropOldestQueue<Arc<ProfileBatch>>,
    stats: &ConsumerStats,
    flush_timeout: Duration,
) {
    let name = consumer.name.clone();
    let snapshot_metrics = |consumer: &LoadedConsumer| {
        *stats.plugin_metrics.lock().unwrap() = consumer.consumer.metrics().into_iter().collect();
        *stats.plugin_health.lock().unwrap() = Some(HealthReport {
            health: consumer.consumer.health(),
            taken: Instant::now(),
        });
    };
    loop {
        let batch = match queue.pop_within(HEALTH_REFRESH) {
            Popped::Item(batch) => batch,
            Popped::TimedOut => {
                snapshot_metrics(&consumer);
                continue;
            }
            Popped::Closed => break,
        };
        stats.queued.store(queue.len() as u64, Relaxed);
        match stats.in_call("consume", || consumer.consumer.consume(&batch)) {
            RResult::ROk(()) => {
                stats.delivered.fetch_add(1, Relaxed);
                stats.last_call_failed.store(false, Relaxed);
            }
            RResult::RErr(e) => stats.fail(&name, "consume", &e),
        }
        drop(batch);
        snapshot_metrics(&consumer);
        // What the plugin built for the batch (and, when it sealed a profile, for that) is
        // freed: give its pages back to the kernel rather than keep them in glibc's free lists.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
    }
    let deadline = Instant::now() + flush_timeout;
    let millis_left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64
    };
    if let RResult::RErr(e) = stats.in_call("flush", || consumer.consumer.flush(millis_left())) {
        stats.fail(&name, "flush", &e);
    }
    snapshot_metrics(&consumer);
    if let RResult::RErr(e) =
        stats.in_call("shutdown", || consumer.consumer.shutdown(millis_left()))
    {
        stats.fail(&name, "shutdown", &e);
    }
    stats.finished.store(true, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_oldest_keeps_the_newest_items() {
        let q = DropOldestQueue::new(2);
        assert_eq!(q.push(1), None);
        assert_eq!(q.push(2), None);
        assert_eq!(q.push(3), Some(1));
        q.close();
        let pop = || q.pop_within(Duration::ZERO);
        assert_eq!(pop(), Popped::Item(2));
        assert_eq!(pop(), Popped::Item(3));
        assert_eq!(pop(), Popped::Closed);
    }

    #[test]
    fn pop_waits_for_a_push_or_its_timeout() {
        let q = Arc::new(DropOldestQueue::new(4));
        assert_eq!(q.pop_within(Duration::from_millis(1)), Popped::TimedOut);
        let q2 = q.clone();
        let t = thread::spawn(move || q2.pop_within(Duration::from_secs(60)));
        thread::sleep(Duration::from_millis(20));
        q.push(7);
        assert_eq!(t.join().unwrap(), Popped::Item(7));
    }
}
