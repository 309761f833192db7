//! Every process the producer has samples of, read from /proc once (and again when a sample
//! shows an address outside its known mappings), and forgotten when it has exited.

use std::{
    collections::{HashMap, HashSet},
    sync::{mpsc::Sender, Arc},
};

use super::ProcessInfo;

/// What the registry tells its watcher (the unwind-table manager).
#[derive(Debug)]
pub enum Update {
    /// A process was read for the first time, or read again (new mappings, exec).
    Read(u32, Arc<ProcessInfo>),
    /// A process has exited and is forgotten.
    Forgotten(u32),
}

/// The processes known to the producer, shared by the filters, the symbolizer and the
/// unwind-table manager. Cloning it is cheap (the facts are shared).
#[derive(Clone, Default)]
pub struct Registry {
    processes: HashMap<u32, Arc<ProcessInfo>>,
    watcher: Option<Sender<Update>>,
}

impl Registry {
    /// An empty registry that reports every change to `watcher`, when given.
    pub fn new(watcher: Option<Sender<Update>>) -> Self {
        Self {
            processes: HashMap::new(),
            watcher,
        }
    }

    /// The facts of `pid`, when known.
    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.processes.get(&pid).map(|p| &**p)
    }

    /// Reads `pid` if it is not known yet (now, so that the facts outlive a short process).
    pub fn learn(&mut self, pid: u32) {
        if pid != 0 && !self.processes.contains_key(&pid) {
            self.refresh(pid);
        }
    }

    /// Reads `pid` again (a library loaded, an exec); keeps the old facts if it is gone.
    pub fn refresh(&mut self, pid: u32) {
        if let Some(info) = ProcessInfo::read(pid) {
            let info = Arc::new(info);
            self.tell(Update::Read(pid, info.clone()));
            self.processes.insert(pid, info);
        }
    }

    /// Reads again, once each, the known processes that have an address outside all of
    /// their known mappings in `stacks` (an exec, a library loaded since).
    pub fn refresh_unmapped<'a>(&mut self, stacks: impl IntoIterator<Item = (u32, &'a [u64])>) {
        let stale: HashSet<u32> = stacks
            .into_iter()
            .filter(|(pid, addresses)| {
                self.get(*pid)
                    .is_some_and(|p| addresses.iter().any(|&a| !p.accounts_for(a)))
            })
            .map(|(pid, _)| pid)
            .collect();
        for pid in stale {
            self.refresh(pid);
        }
    }

    /// Takes the facts `other` read since it was cloned from this registry.
    pub fn absorb(&mut self, other: Registry) {
        self.processes.extend(other.processes);
    }

    /// Forgets the processes that are gone, unless `keep` still wants them (samples of
    /// theirs not published yet).
    pub fn forget_exited(&mut self, keep: &HashSet<u32>) {
        let gone: Vec<u32> = self
            .processes
            .keys()
            .copied()
            .filter(|&pid| !keep.contains(&pid) && !super::is_running(pid))
            .collect();
        for pid in gone {
            self.processes.remove(&pid);
            self.tell(Update::Forgotten(pid));
        }
    }

    fn tell(&self, update: Update) {
        if let Some(watcher) = &self.watcher {
            // A watcher that stopped has nothing left to do with the update.
            let _ = watcher.send(update);
        }
    }
}
