//! The unwind-table manager: builds a table of CFI rows (crate `unwind-table`) for each
//! executable file a sampled process maps, once per file (keyed by GNU build id, else by
//! device, inode, size and modification time) however many processes map it, loads it into
//! the probe's row array, and tells the probe each process's executable mappings.
//!
//! Tables are built lazily, when a process is first sampled, on a thread of their own (the
//! reader never waits for one). Files are opened through `/proc/PID/map_files/` (binaries
//! deleted after start) or `/proc/PID/root/` (other mount namespaces). The row array has a
//! fixed budget; when a new table does not fit, the least recently used tables are evicted
//! and the processes that used them fall back to frame pointers in those files.
//!
//! For a process that runs CPython, the manager also tells the probe where its interpreter
//! is, so that the probe can walk its Python frames.

mod allocator;
mod files;
mod interpreter;
mod probe_maps;

pub use allocator::RowAllocator;
pub use probe_maps::{ProbeMaps, SharedArray};

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::Receiver,
        Arc,
    },
    time::Instant,
};

use probe_common::{
    python::PythonProcess,
    unwind::{ExecMapping, ProcessMappings, UnwindRow, MAX_MAPPINGS},
};

use crate::process::{MapEntry, ProcessInfo, Update};
use files::{FileFacts, FileIdentity, OpenFile, TableKey};

/// Where tables and process mappings go: the probe's maps, or a test's memory.
pub trait TableSink {
    /// Writes `rows` into the row array from index `start`.
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> std::io::Result<()>;
    /// Writes `mappings` into the mapping array from index `start`.
    fn write_mappings(&mut self, start: u32, mappings: &[ExecMapping]) -> std::io::Result<()>;
    /// Points the probe at the run of the mapping array that holds `pid`'s mappings.
    fn set_process(&mut self, pid: u32, run: ProcessMappings) -> Result<(), String>;
    /// Removes what the probe knows of `pid`.
    fn remove_process(&mut self, pid: u32);
    /// Tells the probe where `pid`'s CPython interpreter is (`None`: it has none).
    fn set_python(&mut self, pid: u32, python: Option<PythonProcess>) -> Result<(), String>;
}

/// The manager's counters, shared with the telemetry endpoint.
#[derive(Debug, Default)]
pub struct TableStats {
    /// Tables loaded now.
    pub tables: AtomicU64,
    /// Rows in use in the row array.
    pub rows_used: AtomicU64,
    /// Rows the row array holds (the budget).
    pub rows_capacity: AtomicU64,
    /// Processes whose mappings the probe knows.
    pub processes: AtomicU64,
    /// Entries of the mapping array in use.
    pub mappings_used: AtomicU64,
    /// Tables evicted to make room.
    pub evictions: AtomicU64,
    /// Files whose table could not be built (unreadable, not ELF, bad CFI) or did not fit.
    pub failures: AtomicU64,
    /// Time spent building tables, in microseconds.
    pub build_micros: AtomicU64,
}

impl TableStats {
    /// Kernel memory of the unwinder's maps: the row array, the mapping array and the
    /// process entries.
    pub fn map_bytes(&self) -> u64 {
        self.rows_capacity.load(Relaxed) * size_of::<UnwindRow>() as u64
            + u64::from(MAPPING_CAPACITY) * size_of::<ExecMapping>() as u64
            + self.processes.load(Relaxed) * size_of::<ProcessMappings>() as u64
    }
}

/// A table loaded into the row array.
struct Table {
    start: u32,
    len: u32,
    /// Value of the manager's clock when a process last asked for it.
    last_used: u64,
}

/// A process the probe knows: its mappings and where they are in the mapping array.
struct Process {
    maps: Vec<Loaded>,
    run: Option<ProcessMappings>,
}

/// Why a file's table is not loaded.
enum Unloaded {
    /// The file has none: no CFI, unreadable CFI, or more rows than a table may have.
    NoTable,
    /// It did not fit the budget now (it may later).
    NoRoom,
}

/// One executable mapping of a process and the table it uses.
struct Loaded {
    map: MapEntry,
    bias: u64,
    table: Option<TableKey>,
}

/// Entries of the probe's mapping array (the executable mappings of every process).
pub const MAPPING_CAPACITY: u32 = 1 << 16;

/// Builds, loads, shares and evicts unwind tables; see the module documentation.
pub struct TableManager<S: TableSink> {
    sink: S,
    /// Whether the probe is told where CPython processes' interpreters are.
    python_frames: bool,
    rows: RowAllocator,
    max_table_rows: u32,
    /// Runs of the mapping array, one per process.
    mapping_runs: RowAllocator,
    tables: HashMap<TableKey, Table>,
    files: HashMap<FileIdentity, Arc<FileFacts>>,
    processes: HashMap<u32, Process>,
    clock: u64,
    stats: Arc<TableStats>,
}

/// Most file facts remembered (a host with more distinct binaries reads some twice).
const MAX_REMEMBERED_FILES: usize = 16_384;

impl<S: TableSink> TableManager<S> {
    /// A manager with a row array of `capacity` rows behind `sink`, building no table that
    /// could have more than `max_table_rows` rows (one giant library would otherwise cost
    /// the agent its size in memory while it is built, and push most other tables out).
    pub fn new(sink: S, capacity: u32, max_table_rows: u32, stats: Arc<TableStats>) -> Self {
        stats.rows_capacity.store(u64::from(capacity), Relaxed);
        Self {
            sink,
            python_frames: true,
            rows: RowAllocator::new(capacity),
            max_table_rows,
            mapping_runs: RowAllocator::new(MAPPING_CAPACITY),
            tables: HashMap::new(),
            files: HashMap::new(),
            processes: HashMap::new(),
            clock: 0,
            stats,
        }
    }

    /// Whether the probe walks CPython processes' frames (it does unless told otherwise).
    pub fn with_python_frames(mut self, python_frames: bool) -> Self {
        self.python_frames = python_frames;
        self
    }

    /// Applies updates until the registry's side hangs up.
    pub fn run(mut self, updates: Receiver<Update>) {
        for update in updates {
            self.apply(update);
        }
    }

    /// Loads the tables of a process read by the registry, or forgets a process.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Read(pid, info) => self.load_process(pid, &info),
            Update::Forgotten(pid) => {
                if let Some(process) = self.processes.remove(&pid) {
                    self.sink.remove_process(pid);
                    if let Some(run) = process.run {
                        self.mapping_runs.release(run.first, run.count);
                    }
                }
            }
        }
        self.stats
            .mappings_used
            .store(u64::from(self.mapping_runs.used()), Relaxed);
        self.stats
            .processes
            .store(self.processes.len() as u64, Relaxed);
    }

    /// Loads the tables of every executable file `pid` maps, then publishes its mappings.
    /// The tables it already shares with others are marked used first, so that making room
    /// for its new ones never evicts them.
    fn load_process(&mut self, pid: u32, info: &ProcessInfo) {
        let started = Instant::now();
        let tables_before = self.tables.len();
        self.clock += 1;
        let mut loaded = Vec::with_capacity(info.maps.len());
        let mut missing = Vec::new();
        for map in &info.maps {
            let mut entry = Loaded {
                map: map.clone(),
                bias: 0,
                table: None,
            };
            if let Some((file, facts)) = map.is_file().then(|| self.file(pid, map)).flatten() {
                entry.bias = facts.bias(map.start, map.offset).unwrap_or(0);
                entry.table = facts.key.clone();
                match entry
                    .table
                    .as_ref()
                    .and_then(|key| self.tables.get_mut(key))
                {
                    Some(table) => table.last_used = self.clock,
                    None if entry.table.is_some() => missing.push((loaded.len(), file, facts)),
                    None => {}
                }
            }
            loaded.push(entry);
        }
        for (index, file, facts) in missing {
            let entry = &loaded[index];
            let key = entry.table.clone().expect("missing tables have a key");
            if self.tables.contains_key(&key) {
                continue; // built for an earlier mapping of the same file
            }
            match self.load_table(pid, &entry.map, &file, &key, facts.estimated_rows()) {
                Ok(()) => {}
                Err(Unloaded::NoRoom) => loaded[index].table = None,
                Err(Unloaded::NoTable) => {
                    loaded[index].table = None;
                    // Not tried again for every process that maps the file.
                    self.files
                        .insert(file.identity, Arc::new(facts.without_table()));
                }
            }
        }
        let old_run = self.processes.get(&pid).and_then(|p| p.run);
        self.processes.insert(
            pid,
            Process {
                maps: loaded,
                run: old_run,
            },
        );
        self.publish(pid);
        let python = self
            .python_frames
            .then(|| interpreter::python_of(pid, &info.maps))
            .flatten();
        if let Err(e) = self.sink.set_python(pid, python) {
            tracing::debug!(pid, "cannot tell the probe where CPython is: {e}");
        }
        tracing::debug!(
            pid,
            comm = %info.comm,
            new_tables = self.tables.len().saturating_sub(tables_before),
            micros = started.elapsed().as_micros() as u64,
            "unwind tables loaded"
        );
    }

    /// The open file of `map` and what is known of it (read once per file).
    fn file(&mut self, pid: u32, map: &MapEntry) -> Option<(OpenFile, Arc<FileFacts>)> {
        let file = files::open(pid, map)?;
        let facts = match self.files.get(&file.identity) {
            Some(facts) => facts.clone(),
            None => {
                let facts = Arc::new(file.facts());
                if self.files.len() >= MAX_REMEMBERED_FILES {
                    self.files.clear();
                }
                self.files.insert(file.identity, facts.clone());
                facts
            }
        };
        Some((file, facts))
    }

    /// Builds the table of `file` and loads it under `key`.
    fn load_table(
        &mut self,
        pid: u32,
        map: &MapEntry,
        file: &OpenFile,
        key: &TableKey,
        estimated_rows: u64,
    ) -> Result<(), Unloaded> {
        if estimated_rows > u64::from(self.max_table_rows) {
            // Building it would cost the agent memory in proportion, and it would push most
            // other tables out of the budget: frame pointers in this file instead.
            tracing::debug!(path = %map.path, estimated_rows, "unwind table too large for the budget: not built");
            self.stats.failures.fetch_add(1, Relaxed);
            return Err(Unloaded::NoTable);
        }
        let started = Instant::now();
        let built = file.build_rows();
        self.stats
            .build_micros
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        let rows = match built {
            Ok(rows) if !rows.is_empty() => rows,
            Ok(_) => return Err(Unloaded::NoTable),
            Err(reason) => {
                tracing::debug!(path = %map.path, pid, "no unwind table: {reason}");
                self.stats.failures.fetch_add(1, Relaxed);
                return Err(Unloaded::NoTable);
            }
        };
        let Some(start) = self.make_room(rows.len(), pid) else {
            tracing::debug!(path = %map.path, rows = rows.len(), "unwind table larger than the free budget");
            self.stats.failures.fetch_add(1, Relaxed);
            return Err(Unloaded::NoRoom);
        };
        if let Err(e) = self.sink.write_rows(start, &rows) {
            tracing::warn!(path = %map.path, "writing an unwind table into the probe failed: {e}");
            self.rows.release(start, rows.len() as u32);
            self.stats.failures.fetch_add(1, Relaxed);
            return Err(Unloaded::NoRoom);
        }
        self.tables.insert(
            key.clone(),
            Table {
                start,
                len: rows.len() as u32,
                last_used: self.clock,
            },
        );
        self.count_tables();
        Ok(())
    }

    /// A free run of `len` rows, evicting the least recently used tables as needed (never
    /// one that `pid`, being loaded, already uses).
    fn make_room(&mut self, len: usize, pid: u32) -> Option<u32> {
        let len = u32::try_from(len)
            .ok()
            .filter(|&l| l <= self.rows.capacity())?;
        loop {
            if let Some(start) = self.rows.allocate(len) {
                return Some(start);
            }
            let victim = self
                .tables
                .iter()
                .filter(|(_, t)| t.last_used < self.clock)
                .min_by_key(|(_, t)| t.last_used)
                .map(|(key, _)| key.clone())?;
            let table = self.tables.remove(&victim).expect("victim is a table");
            self.rows.release(table.start, table.len);
            self.stats.evictions.fetch_add(1, Relaxed);
            let users: Vec<u32> = self
                .processes
                .iter()
                .filter(|(&p, process)| {
                    p != pid
                        && process
                            .maps
                            .iter()
                            .any(|m| m.table.as_ref() == Some(&victim))
                })
                .map(|(&p, _)| p)
                .collect();
            for user in users {
                self.publish(user);
            }
            self.count_tables();
        }
    }

    /// Tells the probe the mappings of `pid` with the tables loaded now: a fresh run of the
    /// mapping array, then the process entry pointing at it, then the old run is freed (a
    /// sample being unwound meanwhile reads either the old or the new run, both whole).
    fn publish(&mut self, pid: u32) {
        let Some(process) = self.processes.get(&pid) else {
            return;
        };
        let mut mappings: Vec<ExecMapping> = process
            .maps
            .iter()
            .map(|m| {
                let table = m.table.as_ref().and_then(|key| self.tables.get(key));
                ExecMapping {
                    start: m.map.start,
                    end: m.map.end,
                    bias: m.bias,
                    table_start: table.map_or(0, |t| t.start),
                    table_len: table.map_or(0, |t| t.len),
                }
            })
            .collect();
        if mappings.len() > MAX_MAPPINGS {
            // Mappings with a table first when there are too many for the probe's search.
            mappings.sort_by_key(|m| (m.table_len == 0, m.start));
            mappings.truncate(MAX_MAPPINGS);
            mappings.sort_by_key(|m| m.start);
        }
        let old_run = process.run;
        let count = mappings.len() as u32;
        let Some(first) = self.mapping_runs.allocate(count) else {
            tracing::debug!(pid, "the probe's mapping array is full");
            return;
        };
        let run = ProcessMappings { first, count };
        let published = self
            .sink
            .write_mappings(first, &mappings)
            .map_err(|e| e.to_string())
            .and_then(|()| self.sink.set_process(pid, run));
        let kept = match published {
            Ok(()) => {
                if let Some(old) = old_run {
                    self.mapping_runs.release(old.first, old.count);
                }
                Some(run)
            }
            Err(e) => {
                tracing::debug!(pid, "the probe did not take the process's mappings: {e}");
                self.mapping_runs.release(first, count);
                old_run
            }
        };
        if let Some(process) = self.processes.get_mut(&pid) {
            process.run = kept;
        }
    }

    fn count_tables(&self) {
        self.stats.tables.store(self.tables.len() as u64, Relaxed);
        self.stats
            .rows_used
            .store(u64::from(self.rows.used()), Relaxed);
    }
}

#[cfg(test)]
mod tests;
