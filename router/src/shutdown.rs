//! Signals: the first SIGINT/SIGTERM asks everything to stop and deliver what it has; a
//! second one exits at once; SIGHUP reloads the configuration.

use std::{
    sync::{mpsc, Arc, Condvar, Mutex},
    time::Duration,
};

use signal_hook::{
    consts::{SIGHUP, TERM_SIGNALS},
    iterator::Signals,
};

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

/// What a signal asks of the running agent, besides stopping.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP: read the configuration again and apply what changed.
    Reload,
    /// The agent is stopping: no more requests.
    Stop,
}

/// The signals the agent acts on (SIGINT, SIGTERM, SIGQUIT, SIGHUP), caught from the start of
/// `main`: one that arrives while the agent is still starting waits for it instead of
/// killing it.
pub struct AgentSignals(Signals);

impl AgentSignals {
    /// Catches the signals from now on; nothing acts on them until [`AgentSignals::handle`].
    /// They are unblocked too, should the agent's parent have started it with them blocked:
    /// one sent before this call is then caught now rather than never.
    pub fn catch() -> std::io::Result<Self> {
        let wanted: Vec<i32> = TERM_SIGNALS.iter().copied().chain([SIGHUP]).collect();
        let signals = Signals::new(&wanted)?;
        // SAFETY: sigemptyset/sigaddset fill a local set; pthread_sigmask changes only this
        // thread's mask (the only thread: called first thing in main, and inherited by the
        // threads started later).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &signal in &wanted {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        Ok(Self(signals))
    }

    /// Acts on the signals from a thread of its own: the first SIGINT/SIGTERM/SIGQUIT triggers
    /// `stop`, a second exits at once; SIGHUP sends [`Request::Reload`] to `requests`.
    pub fn handle(self, stop: StopSignal, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
        let Self(mut signals) = self;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut seen = 0;
                for signal in signals.forever() {
                    if signal == SIGHUP {
                        tracing::info!("SIGHUP: reloading the configuration");
                        let _ = requests.send(Request::Reload);
                        continue;
                    }
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
}
