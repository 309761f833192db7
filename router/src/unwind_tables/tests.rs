//! The manager against real processes (children of the test) and an in-memory sink.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    sync::{atomic::Ordering::Relaxed, Arc},
};

use probe_common::{
    python::PythonProcess,
    unwind::{ExecMapping, ProcessMappings, UnwindRow},
};

use super::{TableManager, TableSink, TableStats};
use crate::process::{ProcessInfo, Update};

/// The probe's maps, in memory.
#[derive(Default)]
struct MemorySink {
    /// Every table written: start -> rows.
    tables: HashMap<u32, usize>,
    mappings: HashMap<u32, ExecMapping>,
    processes: HashMap<u32, ProcessMappings>,
    python: HashMap<u32, PythonProcess>,
}

impl MemorySink {
    /// The mappings the probe would search for `pid`.
    fn mappings_of(&self, pid: u32) -> Vec<ExecMapping> {
        let run = self.processes[&pid];
        (run.first..run.first + run.count)
            .map(|i| self.mappings[&i])
            .collect()
    }
}

impl TableSink for &mut MemorySink {
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> std::io::Result<()> {
        self.tables.insert(start, rows.len());
        Ok(())
    }
    fn write_mappings(&mut self, start: u32, mappings: &[ExecMapping]) -> std::io::Result<()> {
        for (i, m) in mappings.iter().enumerate() {
            self.mappings.insert(start + i as u32, *m);
        }
        Ok(())
    }
    fn set_process(&mut self, pid: u32, run: ProcessMappings) -> Result<(), String> {
        self.processes.insert(pid, run);
        Ok(())
    }
    fn remove_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.python.remove(&pid);
    }
    fn set_python(&mut self, pid: u32, python: Option<PythonProcess>) -> Result<(), String> {
        match python {
            Some(python) => self.python.insert(pid, python),
            None => self.python.remove(&pid),
        };
        Ok(())
    }
}

/// A process that waits (on its stdin) until dropped.
struct Waiting(Child);

impl Waiting {
    fn start(program: &str) -> (Waiting, u32, Arc<ProcessInfo>) {
        let child = Command::new(program)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until its executable and libc are mapped.
        let info = loop {
            let info = ProcessInfo::read(pid).unwrap();
            if info.maps.iter().any(|m| m.path.contains("libc")) {
                break info;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        (Waiting(child), pid, Arc::new(info))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Rows of the table of the file at `path`.
fn rows_of(path: &str) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    unwind_table::build(&bytes[..]).unwrap().rows.len() as u32
}

fn file_of<'a>(info: &'a ProcessInfo, name: &str) -> &'a str {
    &info
        .maps
        .iter()
        .find(|m| m.is_file() && m.path.contains(name))
        .unwrap()
        .path
}

#[test]
fn processes_mapping_the_same_files_share_their_tables() {
    let (_a, a, a_info) = Waiting::start("cat");
    let (_b, b, b_info) = Waiting::start("cat");
    let mut sink = MemorySink::default();
    let stats = Arc::new(TableStats::default());
    let mut manager = TableManager::new(&mut sink, 1 << 20, 1 << 20, stats.clone());
    manager.apply(Update::Read(a, a_info.clone()));
    manager.apply(Update::Read(b, b_info));
    drop(manager);

    let files: std::collections::HashSet<&str> = a_info
        .maps
        .iter()
        .filter(|m| m.is_file())
        .map(|m| m.path.as_str())
        .collect();
    assert_eq!(
        sink.tables.len(),
        files.len(),
        "one table per file: {files:?}"
    );
    assert_eq!(sink.mappings_of(a).len(), a_info.maps.len());
    // The same file's mapping in both processes points at the same rows.
    let libc_start = |pid| {
        sink.mappings_of(pid)
            .into_iter()
            .filter(|m| m.table_len > 0)
            .map(|m| (m.table_start, m.table_len))
            .collect::<Vec<_>>()
    };
    assert_eq!(libc_start(a), libc_start(b));
    assert_eq!(stats.tables.load(Relaxed), files.len() as u64);
}

#[test]
fn a_table_that_does_not_fit_evicts_the_least_recently_used_and_its_users_fall_back() {
    let (_sort, sorter, sorter_info) = Waiting::start("sort");
    let (_cat, catter, catter_info) = Waiting::start("cat");
    let libc = rows_of(file_of(&sorter_info, "libc"));
    let loader = rows_of(file_of(&sorter_info, "ld-linux"));
    let sort = rows_of(file_of(&sorter_info, "sort"));
    let cat = rows_of(file_of(&catter_info, "cat"));
    assert!(
        sort > cat,
        "sort's table ({sort}) is bigger than cat's ({cat})"
    );

    // Room for sort's tables and half of cat's own: cat's needs sort's room.
    let capacity = sort + libc + loader + cat / 2;
    let mut sink = MemorySink::default();
    let stats = Arc::new(TableStats::default());
    let mut manager = TableManager::new(&mut sink, capacity, u32::MAX, stats.clone());
    manager.apply(Update::Read(sorter, sorter_info.clone()));
    manager.apply(Update::Read(catter, catter_info.clone()));
    let evictions = stats.evictions.load(Relaxed);
    let published = |sink: &MemorySink, pid: u32, info: &ProcessInfo, name: &str| {
        let exe = info.maps.iter().find(|m| m.path.ends_with(name)).unwrap();
        sink.mappings_of(pid)
            .into_iter()
            .find(|m| m.start == exe.start)
            .unwrap()
    };
    manager.apply(Update::Forgotten(catter));
    let mappings_left = stats.mappings_used.load(Relaxed);
    drop(manager);

    assert_eq!(evictions, 1);
    assert_eq!(
        published(&sink, sorter, &sorter_info, "/sort").table_len,
        0,
        "sort's own table was evicted for cat's: frame pointers there"
    );
    assert!(
        sink.mappings_of(sorter).iter().any(|m| m.table_len == libc),
        "libc's table, shared with cat, stays"
    );
    // The forgotten process's entry and mapping run are gone.
    assert!(!sink.processes.contains_key(&catter));
    assert_eq!(mappings_left, sorter_info.maps.len() as u64);
}

#[test]
fn a_table_that_could_take_more_than_allowed_is_not_built() {
    let (_cat, pid, info) = Waiting::start("cat");
    let mut sink = MemorySink::default();
    let stats = Arc::new(TableStats::default());
    // Room for everything, but no table of libc's size allowed.
    let mut manager = TableManager::new(&mut sink, 1 << 20, 10_000, stats.clone());
    manager.apply(Update::Read(pid, info.clone()));
    let refused = stats.failures.load(Relaxed);
    // Another process of the same files: the verdict is remembered, not reached again.
    let (_other, other, other_info) = Waiting::start("cat");
    manager.apply(Update::Read(other, other_info));
    drop(manager);
    assert_eq!(stats.failures.load(Relaxed), refused);
    let libc = info.maps.iter().find(|m| m.path.contains("libc")).unwrap();
    let published = sink.mappings_of(pid);
    let libc_mapping = published.iter().find(|m| m.start == libc.start).unwrap();
    assert_eq!(libc_mapping.table_len, 0, "libc left to frame pointers");
    assert!(
        published.iter().any(|m| m.table_len > 0),
        "the small tables are built"
    );
    assert!(stats.failures.load(Relaxed) >= 1);
}
