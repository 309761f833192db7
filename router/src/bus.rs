//! The pub/sub bus: one bounded drop-oldest queue and one thread per consumer, so a slow or
//! failing consumer never delays the others or the producer.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc, Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::RResult;
use plugin_api::{PluginMetric, ProfileBatch};

use crate::plugin_host::LoadedConsumer;

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

    /// The oldest item, waiting for one; `None` once the queue is closed and empty.
    pub fn pop(&self) -> Option<T> {
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap();
        }
    }

    /// No more pushes: `pop` returns what is left, then `None`.
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

/// Counters of one consumer's deliveries.
#[derive(Default, Debug)]
pub struct ConsumerStats {
    /// Batches published to this consumer.
    pub received: AtomicU64,
    /// Batches the consumer took without error.
    pub delivered: AtomicU64,
    /// Batches dropped because its queue was full.
    pub dropped: AtomicU64,
    /// Calls that returned an error or panicked.
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
    /// What keeps the plugin from delivering, as it said after its last call.
    pub plugin_problem: Mutex<Option<String>>,
}

impl ConsumerStats {
    fn fail(&self, consumer: &str, call: &str, error: &str) {
        self.failed.fetch_add(1, Relaxed);
        self.last_call_failed.store(true, Relaxed);
        *self.last_error.lock().unwrap() = Some(error.to_owned());
        tracing::error!(consumer, call, error, "consumer call failed");
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
}

/// Fans every published batch out to every consumer.
pub struct Bus {
    subscribers: Vec<Subscriber>,
    finished: mpsc::Receiver<String>,
}

impl Bus {
    /// Starts one thread per consumer, each behind a queue of `capacity` batches. Once its
    /// queue is closed and drained, a consumer gets `flush_timeout` to flush and shut down.
    pub fn start(consumers: Vec<(LoadedConsumer, usize)>, flush_timeout: Duration) -> Bus {
        let (finished_tx, finished) = mpsc::channel();
        let subscribers = consumers
            .into_iter()
            .map(|(consumer, capacity)| {
                let subscriber = Subscriber {
                    name: consumer.name.clone(),
                    queue: Arc::new(DropOldestQueue::new(capacity)),
                    stats: Arc::new(ConsumerStats::default()),
                };
                let queue = subscriber.queue.clone();
                let stats = subscriber.stats.clone();
                let finished_tx = finished_tx.clone();
                thread::Builder::new()
                    .name(format!("consumer-{}", consumer.name))
                    .spawn(move || {
                        let name = consumer.name.clone();
                        deliver_until_closed(consumer, &queue, &stats, flush_timeout);
                        let _ = finished_tx.send(name);
                    })
                    .expect("spawn consumer thread");
                subscriber
            })
            .collect();
        Bus {
            subscribers,
            finished,
        }
    }

    /// Hands `batch` to every consumer without waiting for any of them; one shared copy.
    pub fn publish(&self, batch: ProfileBatch) {
        let batch = Arc::new(batch);
        for s in &self.subscribers {
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
            .iter()
            .map(|s| (s.name.clone(), s.stats.clone()))
            .collect()
    }

    /// Closes every queue and waits until each consumer has taken what was queued, flushed and
    /// shut down, for at most `timeout`. Returns the names of the consumers that did not finish.
    pub fn shutdown(self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        for s in &self.subscribers {
            s.queue.close();
        }
        let mut pending: Vec<String> = self.subscribers.iter().map(|s| s.name.clone()).collect();
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.finished.recv_timeout(left) {
                Ok(name) => pending.retain(|n| *n != name),
                Err(_) => break,
            }
        }
        for s in &self.subscribers {
            tracing::info!(consumer = %s.name, "consumer stopped: {}", s.stats.summary());
        }
        for name in &pending {
            tracing::error!(consumer = %name, ?timeout, "consumer did not finish within the shutdown timeout");
        }
        pending
    }
}

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
        *stats.plugin_problem.lock().unwrap() =
            consumer.consumer.health().into_option().map(String::from);
    };
    while let Some(batch) = queue.pop() {
        stats.queued.store(queue.len() as u64, Relaxed);
        match consumer.consumer.consume(&batch) {
            RResult::ROk(()) => {
                stats.delivered.fetch_add(1, Relaxed);
                stats.last_call_failed.store(false, Relaxed);
            }
            RResult::RErr(e) => stats.fail(&name, "consume", &e),
        }
        drop(batch);
        snapshot_metrics(&consumer);
    }
    let deadline = Instant::now() + flush_timeout;
    let millis_left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64
    };
    if let RResult::RErr(e) = consumer.consumer.flush(millis_left()) {
        stats.fail(&name, "flush", &e);
    }
    snapshot_metrics(&consumer);
    if let RResult::RErr(e) = consumer.consumer.shutdown(millis_left()) {
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
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), Some(3));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn pop_waits_for_a_push() {
        let q = Arc::new(DropOldestQueue::new(4));
        let q2 = q.clone();
        let t = thread::spawn(move || q2.pop());
        thread::sleep(Duration::from_millis(20));
        q.push(7);
        assert_eq!(t.join().unwrap(), Some(7));
    }
}
