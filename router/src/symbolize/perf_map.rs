//! Names for JIT-compiled code from perf map files.
//!
//! JITs that want their code named by profilers write `/tmp/perf-<PID>.map`: Node with
//! `--perf-basic-prof`, Java with `jcmd PID Compiler.perfmap`, Python 3.12 with `-X perf`, .NET
//! with `DOTNET_PerfMapEnabled`. Each line is `<start hex> <size hex> <name>`: start and size
//! usually without `0x` (accepted with it), the name is the rest of the line and may contain
//! spaces. JITs re-use memory, so when two lines cover the same address the later one wins.
//!
//! The file is `/tmp/perf-<NSPID>.map` inside the process's root (NSPID: the process's pid in
//! its own pid namespace), opened as [`crate::untrusted::open`] says (resolved inside that
//! root, no symlink, a regular file, never a blocking open) and only when the process's own
//! user owns it, as `perf` requires: a map file is the process's word about its own code, and
//! a link or a file of another user would make the root agent publish text that the process
//! could not read itself. It is read incrementally as it grows, at most
//! [`MAX_READ_PER_REFRESH`] bytes at a time, and re-checked at most once per re-check interval
//! per process, only when a lookup misses.

use std::{
    collections::{hash_map, BinaryHeap, HashMap},
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
    os::unix::fs::{FileExt, MetadataExt},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::untrusted::open::{open_in, Root};

/// How often, at most, a process's map file is re-checked (and only when a lookup misses).
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A process without a map file is re-checked every this many re-check intervals.
const MISSING_RECHECKS: u32 = 5;
/// Entries kept per process; lines past it are dropped (and counted).
const MAX_ENTRIES: usize = 200_000;
/// Bytes held for all processes together: names plus the per-entry and per-process overheads.
const BYTE_BUDGET: usize = 32 << 20;
/// What an entry costs besides its name: the entry itself and the name's `Arc` header.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>() + 16;
/// What a process's record costs with no entries (the record, its path, its map slot).
const PROCESS_OVERHEAD: usize = 256;
/// Longer lines are malformed (and skipped up to their newline).
const MAX_LINE: usize = 4096;
/// Bytes of a map file read at one re-check at most; the rest waits for the next one, so a
/// huge (or sparse) file costs a bounded time per re-check, not one long stall.
pub const MAX_READ_PER_REFRESH: u64 = 8 << 20;
/// A process dropped for the byte budget is not read again for this long (its file would be
/// read again from its start).
const EVICTED_PAUSE: Duration = Duration::from_secs(60);

/// Counters of what [`PerfMaps`] read, skipped and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerfMapStats {
    /// Lines skipped because they are not `<start hex> <size hex> <name>` (or too long).
    pub malformed: u64,
    /// Entries not kept because their process was at its entry limit or the byte budget.
    pub dropped: u64,
    /// Processes whose entries were dropped, least recently used first, for the byte budget.
    pub evicted: u64,
    /// Times a map file was opened and read (from the start or from where the last read ended).
    pub reads: u64,
    /// Map files not read: a symlink, not a regular file (a FIFO, a device), on a FUSE file
    /// system, or not owned by the process's user.
    pub refused: u64,
}

/// The perf maps of all processes looked up, bounded: at most 200 000 entries per process and
/// 32 MiB (names plus overheads) for all processes together, the least recently used processes
/// dropped first.
pub struct PerfMaps {
    processes: HashMap<u32, ProcessMap>,
    /// Processes dropped for the byte budget, and when.
    evicted: HashMap<u32, Instant>,
    recheck_interval: Duration,
    missing_interval: Duration,
    max_entries: usize,
    byte_budget: usize,
    /// Sum of the processes' `bytes`.
    bytes: usize,
    /// Lookup counter, for least-recently-used eviction.
    tick: u64,
    stats: PerfMapStats,
}

/// One named range, `[start, end)`.
#[derive(Clone, Debug)]
struct Entry {
    start: u64,
    end: u64,
    name: Arc<str>,
}

/// Identity of a map file: a new inode is a new file, parsed from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Where a process's map file is, and who may own it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MapFile {
    /// The path inside the process's root.
    path: String,
    /// The process's real and effective user ids.
    uids: [u32; 2],
}

/// What is held for one process.
struct ProcessMap {
    /// Where the map file is read, once the process's namespace pid is known.
    path: Option<MapFile>,
    /// The file the entries come from.
    file: Option<FileId>,
    /// Whether the file was there at the last check (entries of a file that vanished stay).
    present: bool,
    /// Bytes of the file consumed: complete lines, and the skipped part of an overlong one.
    offset: u64,
    /// In the middle of an overlong line: skip up to its newline.
    skipping: bool,
    /// Sorted by start, non-overlapping: what each address is named, overlaps resolved.
    index: Vec<Entry>,
    /// Entries read since `index` was built, in file order (all newer than `index`).
    pending: Vec<Entry>,
    /// What this record costs against the byte budget.
    bytes: usize,
    last_check: Instant,
    last_used: u64,
}

/// The bounds a process's entries are kept within.
#[derive(Clone, Copy)]
struct Limits {
    max_entries: usize,
    byte_budget: usize,
}

impl Default for PerfMaps {
    fn default() -> Self {
        Self::new()
    }
}

impl PerfMaps {
    /// No maps yet; a process's map file is re-checked at most once a second, when a lookup
    /// misses (every five seconds when the process has none).
    pub fn new() -> Self {
        Self::with_recheck_interval(RECHECK_INTERVAL)
    }

    /// Like [`PerfMaps::new`] with another re-check interval (a process without a map file is
    /// re-checked every five intervals).
    pub fn with_recheck_interval(interval: Duration) -> Self {
        Self {
            processes: HashMap::new(),
            evicted: HashMap::new(),
            recheck_interval: interval,
            missing_interval: interval * MISSING_RECHECKS,
            max_entries: MAX_ENTRIES,
            byte_budget: BYTE_BUDGET,
            bytes: 0,
            tick: 0,
            stats: PerfMapStats::default(),
        }
    }

    /// The JIT symbol at `address` in process `pid`, reading or re-reading the process's map file as needed.
    pub fn lookup(&mut self, pid: u32, address: u64) -> Option<Arc<str>> {
        self.tick += 1;
        let now = Instant::now();
        let limits = Limits {
            max_entries: self.max_entries,
            byte_budget: self.byte_budget,
        };
        if let Some(&at) = self.evicted.get(&pid) {
            if now.duration_since(at) < EVICTED_PAUSE {
                return None;
            }
            self.evicted.remove(&pid);
        }
        let (fresh, process) = match self.processes.entry(pid) {
            hash_map::Entry::Occupied(o) => (false, o.into_mut()),
            hash_map::Entry::Vacant(v) => (true, v.insert(ProcessMap::new(now))),
        };
        let before = if fresh { 0 } else { process.bytes };
        process.last_used = self.tick;
        if fresh {
            process.refresh(pid, now, limits, &mut self.stats);
        }
        let mut found = process.find(address);
        if found.is_none() && !fresh {
            let interval = if process.present {
                self.recheck_interval
            } else {
                self.missing_interval
            };
            if now.duration_since(process.last_check) >= interval {
                process.refresh(pid, now, limits, &mut self.stats);
                found = process.find(address);
            }
        }
        self.bytes = self.bytes - before + process.bytes;
        if self.bytes > self.byte_budget {
            self.evict_for(pid);
        }
        found
    }

    /// Drops what is held for a process that has exited.
    pub fn forget(&mut self, pid: u32) {
        self.evicted.remove(&pid);
        self.drop_process(pid);
    }

    fn drop_process(&mut self, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            self.bytes -= process.bytes;
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> PerfMapStats {
        self.stats
    }

    /// Drops the least recently used processes other than `keep` until the byte budget holds.
    fn evict_for(&mut self, keep: u32) {
        while self.bytes > self.byte_budget {
            let Some(victim) = self
                .processes
                .iter()
                .filter(|(pid, _)| **pid != keep)
                .min_by_key(|(_, p)| p.last_used)
                .map(|(pid, _)| *pid)
            else {
                break;
            };
            self.drop_process(victim);
            self.evicted.insert(victim, Instant::now());
            self.stats.evicted += 1;
        }
    }
}

impl ProcessMap {
    fn new(now: Instant) -> Self {
        Self {
            path: None,
            file: None,
            present: false,
            offset: 0,
            skipping: false,
            index: Vec::new(),
            pending: Vec::new(),
            bytes: PROCESS_OVERHEAD,
            last_check: now,
            last_used: 0,
        }
    }

    /// The name at `address`, building the index first if entries were read since.
    fn find(&mut self, address: u64) -> Option<Arc<str>> {
        self.build_index();
        let i = self.index.partition_point(|e| e.start <= address);
        let entry = self.index.get(i.checked_sub(1)?)?;
        (address < entry.end).then(|| entry.name.clone())
    }

    /// Folds the pending entries into the index, resolving overlaps (newest wins).
    fn build_index(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut all = std::mem::take(&mut self.index);
        all.append(&mut self.pending);
        self.index = resolve_overlaps(&all);
        self.index.shrink_to_fit();
        self.bytes = PROCESS_OVERHEAD + self.index.iter().map(entry_cost).sum::<usize>();
    }

    /// Checks the map file (one open and `fstat`) and reads what was added since the last
    /// read, or the whole file when it is a new one, [`MAX_READ_PER_REFRESH`] bytes at most.
    fn refresh(&mut self, pid: u32, now: Instant, limits: Limits, stats: &mut PerfMapStats) {
        self.last_check = now;
        if self.path.is_none() {
            self.path = map_file(pid);
        }
        let Some(map) = self.path.clone() else {
            self.present = false;
            return;
        };
        let file = match open_in(Root::Process(pid), &map.path) {
            Ok(file) => file,
            Err(error) => {
                if matches!(
                    error.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                ) {
                    stats.refused += 1;
                    tracing::debug!(pid, path = map.path, %error, "perf map refused");
                }
                self.present = false;
                return;
            }
        };
        let Ok(meta) = file.metadata() else {
            self.present = false;
            return;
        };
        if !map.uids.contains(&meta.uid()) {
            stats.refused += 1;
            tracing::debug!(
                pid,
                path = map.path,
                owner = meta.uid(),
                "perf map refused: not owned by the process's user"
            );
            self.present = false;
            return;
        }
        self.present = true;
        if self.file == Some(FileId::of(&meta)) && meta.len() == self.offset {
            return;
        }
        // A file that cannot be read now is tried again at the next re-check.
        let _ = self.read(file, &meta, limits, stats);
    }

    /// Reads the complete lines of the file past `offset` (all of it when it is another file
    /// than the one read before, or was truncated or rewritten), up to
    /// [`MAX_READ_PER_REFRESH`] bytes.
    fn read(
        &mut self,
        mut file: File,
        meta: &fs::Metadata,
        limits: Limits,
        stats: &mut PerfMapStats,
    ) -> io::Result<()> {
        let id = FileId::of(meta);
        let len = meta.len();
        if self.file != Some(id) || len < self.offset || !self.continues(&file)? {
            self.start_over(id);
        }
        if len == self.offset {
            return Ok(());
        }
        stats.reads += 1;
        file.seek(SeekFrom::Start(self.offset))?;
        let this_time = (len - self.offset).min(MAX_READ_PER_REFRESH);
        let mut reader = BufReader::with_capacity(64 << 10, file.take(this_time));
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            let complete = line.last() == Some(&b'\n');
            if self.skipping {
                self.offset += n as u64;
                self.skipping = !complete;
                continue;
            }
            if !complete {
                if n <= MAX_LINE {
                    // The partial last line: read again, whole, next time.
                    break;
                }
                stats.malformed += 1;
                self.offset += n as u64;
                self.skipping = true;
                continue;
            }
            self.offset += n as u64;
            match parse_line(&line) {
                Line::Entry(entry) => self.add(entry, limits, stats),
                Line::Empty => {}
                Line::Malformed => stats.malformed += 1,
            }
        }
        Ok(())
    }

    /// Whether the file still holds, just before `offset`, the end of the last line read: a
    /// file rewritten in place (same inode, not shorter) most likely does not.
    fn continues(&self, file: &File) -> io::Result<bool> {
        if self.offset == 0 || self.skipping {
            return Ok(true);
        }
        let mut byte = [0u8];
        let n = file.read_at(&mut byte, self.offset - 1)?;
        Ok(n == 1 && byte[0] == b'\n')
    }

    fn start_over(&mut self, id: FileId) {
        self.file = Some(id);
        self.offset = 0;
        self.skipping = false;
        self.index = Vec::new();
        self.pending = Vec::new();
        self.bytes = PROCESS_OVERHEAD;
    }

    /// Keeps `entry` unless the process is at its limits even once overlaps are resolved.
    /// Resolving them (building the index) is tried only when an eighth of the entry limit
    /// has been read since the last time, so that a process at its limits costs no more than
    /// one sort per that many lines.
    fn add(&mut self, entry: Entry, limits: Limits, stats: &mut PerfMapStats) {
        let cost = entry_cost(&entry);
        let fits = |p: &Self| {
            p.index.len() + p.pending.len() < limits.max_entries
                && p.bytes + cost <= limits.byte_budget
        };
        if !fits(self) && self.pending.len() >= (limits.max_entries / 8).max(1) {
            self.build_index();
        }
        if !fits(self) {
            stats.dropped += 1;
            return;
        }
        self.bytes += cost;
        self.pending.push(entry);
    }
}

fn entry_cost(entry: &Entry) -> usize {
    entry.name.len() + ENTRY_OVERHEAD
}

/// `/tmp/perf-<nspid>.map` (inside the process's root), where `nspid` is the last number of
/// the `NSpid:` line of the process's status (its pid in its own pid namespace), and the
/// process's real and effective user ids (its `Uid:` line); `None` when the process is gone.
fn map_file(pid: u32) -> Option<MapFile> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|l| l.split_whitespace().map(|n| n.parse::<u32>().ok()))
    };
    let nspid = field("NSpid:")
        .and_then(|mut numbers| numbers.next_back().flatten())
        // Kernels before 4.1 have no NSpid line: no namespaces to translate through.
        .unwrap_or(pid);
    let mut uids = field("Uid:")?;
    let real = uids.next().flatten()?;
    let effective = uids.next().flatten()?;
    Some(MapFile {
        path: format!("/tmp/perf-{nspid}.map"),
        uids: [real, effective],
    })
}

/// One line of a map file.
#[derive(Debug)]
enum Line {
    Entry(Entry),
    /// Blank, or a range of size 0: nothing to name.
    Empty,
    Malformed,
}

/// Parses `<start hex> <size hex> <name>` (hex with or without `0x`; the name is the rest of
/// the line, spaces included, surrounding whitespace trimmed).
fn parse_line(line: &[u8]) -> Line {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Line::Empty;
    }
    let Some((start, rest)) = split_field(line) else {
        return Line::Malformed;
    };
    let Some((size, name)) = split_field(rest) else {
        return Line::Malformed;
    };
    let (Some(start), Some(size)) = (parse_hex(start), parse_hex(size)) else {
        return Line::Malformed;
    };
    let Some(end) = start.checked_add(size) else {
        return Line::Malformed;
    };
    if name.is_empty() {
        return Line::Malformed;
    }
    if size == 0 {
        return Line::Empty;
    }
    Line::Entry(Entry {
        start,
        end,
        name: String::from_utf8_lossy(name).into(),
    })
}

/// The first whitespace-separated field of `s` (which starts with none) and what follows it,
/// leading whitespace trimmed; `None` when nothing follows.
fn split_field(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = s.iter().position(u8::is_ascii_whitespace)?;
    Some((&s[..end], s[end..].trim_ascii_start()))
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    let digits = s
        .strip_prefix(b"0x")
        .or_else(|| s.strip_prefix(b"0X"))
        .unwrap_or(s);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// The entries (in the order written) as sorted, non-overlapping ranges where each address is
/// named by the latest entry covering it; adjacent pieces of one entry are merged.
fn resolve_overlaps(entries: &[Entry]) -> Vec<Entry> {
    let mut by_start: Vec<usize> = (0..entries.len()).collect();
    by_start.sort_unstable_by_key(|&i| entries[i].start);
    let mut bounds: Vec<u64> = entries.iter().flat_map(|e| [e.start, e.end]).collect();
    bounds.sort_unstable();
    bounds.dedup();
    // The entries covering the current bound, the latest written on top; those that ended
    // are removed when they come to the top.
    let mut covering = BinaryHeap::new();
    let mut next = 0;
    let mut out: Vec<Entry> = Vec::with_capacity(entries.len());
    for (k, &at) in bounds.iter().enumerate() {
        while let Some(&i) = by_start.get(next) {
            if entries[i].start > at {
                break;
            }
            covering.push(i);
            next += 1;
        }
        while covering.peek().is_some_and(|&i| entries[i].end <= at) {
            covering.pop();
        }
        let Some(&latest) = covering.peek() else {
            continue;
        };
        // `latest` ends past `at`, so a bound follows.
        let end = bounds[k + 1];
        let name = &entries[latest].name;
        match out.last_mut() {
            Some(last) if last.end == at && Arc::ptr_eq(&last.name, name) => last.end = end,
            _ => out.push(Entry {
                start: at,
                end,
                name: name.clone(),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        os::unix::fs::{symlink, PermissionsExt},
        path::PathBuf,
        process::{Child, Command, Stdio},
        thread::sleep,
    };

    use super::*;

    /// A process to own a map file: killed, and its map file removed, on drop.
    struct Target {
        child: Child,
        map: PathBuf,
    }

    impl Target {
        fn start() -> Self {
            let child = Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()
                .expect("start sleep");
            let map = PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
            Self { child, map }
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }

        fn write(&self, contents: &str) {
            fs::write(&self.map, contents).unwrap();
        }

        fn append(&self, contents: &str) {
            let mut f = fs::OpenOptions::new().append(true).open(&self.map).unwrap();
            f.write_all(contents.as_bytes()).unwrap();
        }

        /// Replaces the map file by another (a new inode).
        fn replace(&self, contents: &str) {
            let tmp = self.map.with_extension("map.new");
            fs::write(&tmp, contents).unwrap();
            fs::rename(&tmp, &self.map).unwrap();
        }

        fn len(&self) -> u64 {
            fs::metadata(&self.map).unwrap().len()
        }
    }

    impl Drop for Target {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = fs::remove_file(&self.map);
        }
    }

    fn entry(line: &str) -> (u64, u64, String) {
        match parse_line(line.as_bytes()) {
            Line::Entry(e) => (e.start, e.end, e.name.to_string()),
            other => panic!("{line:?}: {other:?}"),
        }
    }

    fn name(maps: &mut PerfMaps, pid: u32, address: u64) -> Option<String> {
        maps.lookup(pid, address).map(|n| n.to_string())
    }

    /// The re-check interval of the tests that wait for it.
    const SHORT: Duration = Duration::from_millis(100);

    /// [`name`], for a lookup made before the re-check is due: `None` when the machine stalled
    /// so long that it was due (and the lookup re-checked), so that nothing can be expected.
    fn name_before_recheck(maps: &mut PerfMaps, pid: u32, address: u64) -> Option<Option<String>> {
        let checked = maps.processes[&pid].last_check;
        let found = name(maps, pid, address);
        (maps.processes[&pid].last_check == checked).then_some(found)
    }

    #[test]
    fn parses_hex_with_and_without_0x_and_names_with_spaces() {
        assert_eq!(
            entry("7fce7c005900 154 JS:^hotLoop [eval]:1:17\n"),
            (
                0x7fce7c005900,
                0x7fce7c005a54,
                "JS:^hotLoop [eval]:1:17".into()
            )
        );
        assert_eq!(
            entry("0x1000 0X20 void Foo::bar(int, char const*)\r\n"),
            (0x1000, 0x1020, "void Foo::bar(int, char const*)".into())
        );
        assert_eq!(
            entry("7f37266dc7b1 b py::my_hot_function:/tmp/a b.py"),
            (
                0x7f37266dc7b1,
                0x7f37266dc7bc,
                "py::my_hot_function:/tmp/a b.py".into()
            )
        );
        assert_eq!(
            entry("ABCDEF\t10\t  name  "),
            (0xabcdef, 0xabcdff, "name".into())
        );
        for empty in ["", "   \n", "1000 0 empty range\n"] {
            assert!(
                matches!(parse_line(empty.as_bytes()), Line::Empty),
                "{empty:?}"
            );
        }
        for bad in [
            "1000 10\n",
            "1000\n",
            "xyz 10 name\n",
            "1000 1g name\n",
            "0x 10 name\n",
            "+1000 10 name\n",
            "-1000 10 name\n",
            "10000000000000000 10 name\n",
            "ffffffffffffffff 2 overflows\n",
            "1000 10 \n",
        ] {
            assert!(
                matches!(parse_line(bad.as_bytes()), Line::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn reads_a_file_skipping_and_counting_malformed_lines() {
        let target = Target::start();
        target.write(
            "1000 10 first one\n\
             garbage\n\
             0x2000 0x8 second\n\
             \n\
             3000 zz bad size\n\
             4000 4 JS:*fourth [eval]:1:2\n",
        );
        let mut maps = PerfMaps::new();
        let pid = target.pid();
        assert_eq!(name(&mut maps, pid, 0x1000).as_deref(), Some("first one"));
        assert_eq!(name(&mut maps, pid, 0x100f).as_deref(), Some("first one"));
        assert_eq!(name(&mut maps, pid, 0x1010), None);
        assert_eq!(name(&mut maps, pid, 0xfff), None);
        assert_eq!(name(&mut maps, pid, 0x2007).as_deref(), Some("second"));
        assert_eq!(name(&mut maps, pid, 0x3000), None);
        assert_eq!(
            name(&mut maps, pid, 0x4001).as_deref(),
            Some("JS:*fourth [eval]:1:2")
        );
        assert_eq!(maps.stats().malformed, 2);
        assert_eq!(
            maps.stats().reads,
            1,
            "misses within the interval re-read nothing"
        );
    }

    #[test]
    fn overlapping_entries_the_latest_written_wins() {
        let target = Target::start();
        target.write(
            "1000 100 old big\n\
             1040 10 newer inside\n\
             1000 20 newest at start\n\
             10f0 20 straddles the end\n\
             5000 10 replaced\n\
             5000 10 replacement\n\
             6000 10 covered\n\
             5f00 200 covers\n",
        );
        let mut maps = PerfMaps::new();
        let pid = target.pid();
        let expect = [
            (0x1000, Some("newest at start")),
            (0x101f, Some("newest at start")),
            (0x1020, Some("old big")),
            (0x103f, Some("old big")),
            (0x1040, Some("newer inside")),
            (0x104f, Some("newer inside")),
            (0x1050, Some("old big")),
            (0x10ef, Some("old big")),
            (0x10f0, Some("straddles the end")),
            (0x110f, Some("straddles the end")),
            (0x1110, None),
            (0x5008, Some("replacement")),
            (0x6008, Some("covers")),
            (0x60ff, Some("covers")),
            (0x6100, None),
        ];
        for (address, want) in expect {
            assert_eq!(
                name(&mut maps, pid, address).as_deref(),
                want,
                "{address:#x}"
            );
        }
    }

    #[test]
    fn overlap_resolution_matches_a_brute_force_scan() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        for _ in 0..50 {
            let entries: Vec<Entry> = (0..random(40) + 1)
                .map(|i| {
                    let start = random(200);
                    Entry {
                        start,
                        end: start + random(40) + 1,
                        name: format!("e{i}").into(),
                    }
                })
                .collect();
            let index = resolve_overlaps(&entries);
            assert!(index.windows(2).all(|w| w[0].end <= w[1].start));
            for address in 0..260 {
                let want = entries
                    .iter()
                    .rev()
                    .find(|e| e.start <= address && address < e.end)
                    .map(|e| e.name.clone());
                let i = index.partition_point(|e| e.start <= address);
                let got = i
                    .checked_sub(1)
                    .map(|i| &index[i])
                    .filter(|e| address < e.end)
                    .map(|e| e.name.clone());
                assert_eq!(got, want, "{address} in {entries:?}");
            }
        }
    }

    #[test]
    fn a_growing_file_is_read_from_where_it_was_left_after_the_interval() {
        let target = Target::start();
        target.write("1000 10 first\n");
        let mut maps = PerfMaps::with_recheck_interval(SHORT);
        let pid = target.pid();
        assert_eq!(name(&mut maps, pid, 0x1000).as_deref(), Some("first"));
        assert_eq!(maps.stats().reads, 1);

        target.append("2000 10 second\n3000 10 par");
        if let Some(found) = name_before_recheck(&mut maps, pid, 0x2000) {
            assert_eq!(found, None, "not re-checked yet");
            assert_eq!(maps.stats().reads, 1);
        }
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x2000).as_deref(), Some("second"));
        assert_eq!(name(&mut maps, pid, 0x1000).as_deref(), Some("first"));
        assert_eq!(name(&mut maps, pid, 0x3000), None, "a partial line waits");
        let complete = target.len() - "3000 10 par".len() as u64;
        assert_eq!(maps.processes[&pid].offset, complete);

        target.append("tial\n");
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x3000).as_deref(), Some("partial"));
        assert_eq!(maps.processes[&pid].offset, target.len());
        assert_eq!(maps.stats().malformed, 0);

        // A miss with nothing new stats the file and reads nothing.
        let reads = maps.stats().reads;
        let before = maps.processes[&pid].last_check;
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x9000), None);
        assert_eq!(maps.stats().reads, reads);
        let checked = maps.processes[&pid].last_check;
        assert!(checked > before, "the miss re-checked");
        // Hits never re-check.
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x2000).as_deref(), Some("second"));
        assert_eq!(maps.processes[&pid].last_check, checked);
    }

    #[test]
    fn a_replaced_or_rewritten_file_is_read_again_from_its_start() {
        let target = Target::start();
        target.write("1000 10 old\n2000 10 kept name\n");
        let mut maps = PerfMaps::with_recheck_interval(SHORT);
        let pid = target.pid();
        assert_eq!(name(&mut maps, pid, 0x1000).as_deref(), Some("old"));

        // A new inode, longer than what was read.
        target.replace("3000 10 new\n2000 10 kept name\n4000 10 more\n");
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x3000).as_deref(), Some("new"));
        assert_eq!(name(&mut maps, pid, 0x1000), None);
        assert_eq!(name(&mut maps, pid, 0x4000).as_deref(), Some("more"));

        // The same inode, shorter.
        target.write("5000 10 shrunk\n");
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x5000).as_deref(), Some("shrunk"));
        assert_eq!(name(&mut maps, pid, 0x3000), None);

        // The same inode, rewritten longer (opened with O_TRUNC and written anew).
        target.write("6000 10 rewritten and longer\n7000 10 too\n");
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x7000).as_deref(), Some("too"));
        assert_eq!(name(&mut maps, pid, 0x5000), None);
        assert_eq!(
            name(&mut maps, pid, 0x6000).as_deref(),
            Some("rewritten and longer")
        );
        assert_eq!(maps.stats().malformed, 0);
    }

    #[test]
    fn a_missing_file_is_remembered_for_a_while() {
        let target = Target::start();
        let mut maps = PerfMaps::with_recheck_interval(SHORT);
        let pid = target.pid();
        assert_eq!(name(&mut maps, pid, 0x1000), None);
        target.write("1000 10 late\n");
        sleep(SHORT * 2);
        if let Some(found) = name_before_recheck(&mut maps, pid, 0x1000) {
            assert_eq!(found, None, "the miss is remembered");
        }
        sleep(SHORT * MISSING_RECHECKS);
        assert_eq!(name(&mut maps, pid, 0x1000).as_deref(), Some("late"));

        // An exited process is no error, just nothing.
        assert_eq!(name(&mut maps, u32::MAX, 0x1000), None);
    }

    #[test]
    fn overlong_lines_are_skipped() {
        let target = Target::start();
        let long = "x".repeat(MAX_LINE * 3);
        target.write(&format!("1000 10 {long}\n2000 10 after\n3000 10 {long}"));
        let mut maps = PerfMaps::with_recheck_interval(SHORT);
        let pid = target.pid();
        assert_eq!(name(&mut maps, pid, 0x2000).as_deref(), Some("after"));
        assert_eq!(name(&mut maps, pid, 0x1000), None);
        assert_eq!(maps.stats().malformed, 2);
        target.append("yyy\n4000 10 then\n");
        sleep(SHORT * 2);
        assert_eq!(name(&mut maps, pid, 0x4000).as_deref(), Some("then"));
        assert_eq!(name(&mut maps, pid, 0x3000), None);
        assert_eq!(maps.stats().malformed, 2);
    }

    #[test]
    fn entries_past_the_limit_are_dropped_after_overlaps_are_resolved() {
        let target = Target::start();
        // Ten lines, seven addresses: after resolving overlaps, 7 fit in 8.
        let mut lines = String::new();
        for i in 0..7 {
            lines += &format!("{:x} 10 f{i}\n", 0x1000 + i * 0x10);
        }
        for i in 0..3 {
            lines += &format!("{:x} 10 g{i}\n", 0x1000 + i * 0x10);
        }
        lines += "9000 10 past\n9100 10 past too\n";
        target.write(&lines);
        let mut maps = PerfMaps::new();
        maps.max_entries = 8;
        let pid = target.pid();
        assert_eq!(name(&mut maps, pid, 0x1000).as_deref(), Some("g0"));
        assert_eq!(name(&mut maps, pid, 0x1060).as_deref(), Some("f6"));
        assert_eq!(name(&mut maps, pid, 0x9000).as_deref(), Some("past"));
        assert_eq!(name(&mut maps, pid, 0x9100), None);
        assert_eq!(maps.stats().dropped, 1);
    }

    #[test]
    fn the_least_recently_used_process_goes_first_for_the_byte_budget() {
        let targets: Vec<Target> = (0..3).map(|_| Target::start()).collect();
        for (i, t) in targets.iter().enumerate() {
            t.write(&format!("1000 10 process {i}\n"));
        }
        let mut maps = PerfMaps::new();
        let one = PROCESS_OVERHEAD + ENTRY_OVERHEAD + "process 0".len();
        maps.byte_budget = 2 * one;
        let pids: Vec<u32> = targets.iter().map(Target::pid).collect();
        assert_eq!(
            name(&mut maps, pids[0], 0x1000).as_deref(),
            Some("process 0")
        );
        assert_eq!(
            name(&mut maps, pids[1], 0x1000).as_deref(),
            Some("process 1")
        );
        assert_eq!(
            name(&mut maps, pids[0], 0x1000).as_deref(),
            Some("process 0")
        );
        assert_eq!(maps.stats().evicted, 0);
        assert_eq!(maps.bytes, 2 * one);
        // Process 1 is the least recently used.
        assert_eq!(
            name(&mut maps, pids[2], 0x1000).as_deref(),
            Some("process 2")
        );
        assert_eq!(maps.stats().evicted, 1);
        assert!(maps.processes.contains_key(&pids[0]));
        assert!(!maps.processes.contains_key(&pids[1]));
        assert_eq!(maps.bytes, 2 * one);

        maps.forget(pids[0]);
        maps.forget(pids[2]);
        assert_eq!(maps.bytes, 0);
        assert!(maps.processes.is_empty());
    }

    #[test]
    fn the_map_is_found_inside_the_process_root_by_namespace_pid_with_its_users() {
        let target = Target::start();
        let me = fs::metadata("/proc/self").unwrap().uid();
        assert_eq!(
            map_file(target.pid()).unwrap(),
            MapFile {
                path: format!("/tmp/perf-{}.map", target.pid()),
                uids: [me, me],
            }
        );
        assert_eq!(map_file(u32::MAX), None);
    }

    #[test]
    fn a_link_a_fifo_or_a_file_of_another_user_is_refused_without_waiting() {
        let target = Target::start();
        let secret = tempfile::NamedTempFile::new().unwrap();
        fs::write(secret.path(), "1000 10 the secret\n").unwrap();
        fs::set_permissions(secret.path(), fs::Permissions::from_mode(0o600)).unwrap();
        let mut maps = PerfMaps::with_recheck_interval(Duration::ZERO);

        symlink(secret.path(), &target.map).unwrap();
        assert_eq!(name(&mut maps, target.pid(), 0x1004), None);
        assert_eq!(maps.stats().refused, 1);

        fs::remove_file(&target.map).unwrap();
        let fifo = std::ffi::CString::new(target.map.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        maps.forget(target.pid());
        assert_eq!(
            name(&mut maps, target.pid(), 0x1004),
            None,
            "no writer: no wait"
        );
        assert_eq!(maps.stats().refused, 2);

        fs::remove_file(&target.map).unwrap();
        target.write("1000 10 not mine\n");
        let nobody = 65534;
        std::os::unix::fs::chown(&target.map, Some(nobody), None).unwrap();
        maps.forget(target.pid());
        assert_eq!(name(&mut maps, target.pid(), 0x1004), None);
        assert_eq!(maps.stats().refused, 3);
        assert_eq!(maps.stats().reads, 0);
    }

    #[test]
    fn a_huge_file_is_read_a_bounded_part_at_a_time() {
        let target = Target::start();
        let line = |i: u64| format!("{:010x} 10 f{i:0200}\n", 0x1000 + i * 0x10);
        let per_line = line(0).len() as u64;
        let lines = MAX_READ_PER_REFRESH / per_line * 2 + 10;
        let text: String = (0..lines).map(line).collect();
        target.write(&text);
        let last = 0x1000 + (lines - 1) * 0x10;
        let mut maps = PerfMaps::with_recheck_interval(Duration::ZERO);
        assert_eq!(
            name(&mut maps, target.pid(), 0x1000).as_deref(),
            Some(&*format!("f{:0200}", 0))
        );
        assert_eq!(maps.stats().reads, 1);
        assert_eq!(maps.processes[&target.pid()].offset % per_line, 0);
        assert!(maps.processes[&target.pid()].offset <= MAX_READ_PER_REFRESH);
        // Each miss reads on from where the last read stopped.
        assert_eq!(name(&mut maps, target.pid(), last), None);
        assert_eq!(
            name(&mut maps, target.pid(), last).as_deref(),
            Some(&*format!("f{:0200}", lines - 1))
        );
        assert_eq!(maps.stats().reads, 3);
    }
}
