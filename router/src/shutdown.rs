//! Graceful shutdown: the first SIGINT/SIGTERM asks everything to stop and deliver what it
//! has; a second one exits at once.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use signal_hook::{consts::TERM_SIGNALS, iterator::Signals};

/// A flag that asks the producer to stop, and lets it sleep until then.
#[derive(Clone, Default)]
pub struct StopSignal(Arc<(Mutex<bool>, Condvar)>);

impl StopSignal {
    /// A signal that has not been triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks everything waiting on this signal to stop.
    pub fn trigger(&self) {
        let (stopped, changed) = &*self.0;
        *stopped.lock().unwrap() = true;
        changed.notify_all();
    }

    /// Whether [`StopSignal::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        *self.0 .0.lock().unwrap()
    }

    /// Sleeps for `timeout` or until triggered; returns whether it was triggered.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (stopped, changed) = &*self.0;
        let guard = stopped.lock().unwrap();
        let (guard, _) = changed
            .wait_timeout_while(guard, timeout, |stopped| !*stopped)
            .unwrap();
        *guard
    }
}

/// Triggers `stop` on the first SIGINT/SIGTERM/SIGQUIT; exits the process on the second.
pub fn install_signal_handlers(stop: StopSignal) -> std::io::Result<()> {
    let mut signals = Signals::new(TERM_SIGNALS)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(
                        signal,
                        "stopping: delivering what was collected (signal again to exit at once)"
                    );
                    stop.trigger();
                } else {
                    tracing::warn!(signal, "second signal: exiting at once");
                    std::process::exit(130);
                }
            }
        })?;
    Ok(())
}
