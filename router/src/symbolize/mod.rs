//! Symbolization, once, in the router, with blazesym: kernel frames through kallsyms (or a
//! vmlinux), user frames through the ELF symbols (and DWARF lines when the file carries DWARF)
//! of the file each address maps to, or of its separate debug file when it is stripped
//! ([`name_source`]). Answers are cached per file (device, inode and build id) and file
//! offset, within [`CacheLimits`]: the least recently used go first, and blazesym keeps only
//! the most recently used files open. A file that cannot be read is tried again
//! [`RETRY_AFTER_INTERVALS`] intervals later, and why it could not is counted
//! ([`Unreadable`]).
//!
//! ```no_run
//! use std::collections::HashSet;
//! use router::{process::ProcessInfo, symbolize::Symbolizer};
//!
//! let pid = std::process::id();
//! let process = ProcessInfo::read(pid).unwrap();
//! let address = main as *const () as u64;
//! let map = process.mapping_of(address).unwrap();
//! let offset = map.file_offset(address);
//! let mut symbolizer = Symbolizer::new();
//! symbolizer.prepare_user(pid, map, &HashSet::from([offset]));
//! println!("{:?}", symbolizer.user(pid, map, offset));
//! symbolizer.end_interval();
//! ```

mod cache;
mod mapped_file;
mod name_source;
pub mod perf_map;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use blazesym::symbolize::{
    evict::{self, Evict},
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer as Blazesym,
};

pub use self::{cache::CacheLimits, mapped_file::Unreadable};
use self::{
    cache::SymbolCache,
    mapped_file::{FileKey, MappedFile},
    name_source::NameSource,
};
use crate::process::MapEntry;

/// Intervals after which a file that could not be read or parsed is tried again (a minute
/// at the default 10 s interval).
pub const RETRY_AFTER_INTERVALS: u64 = 6;

/// A resolved code location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// Function name (demangled).
    pub name: String,
    /// Source file, when debug info says.
    pub file: Option<String>,
    /// Source line, 0 when unknown.
    pub line: u32,
}

/// The symbolizer's counters and the size of its caches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache, so far.
    pub hits: u64,
    /// Lookups that went to blazesym, so far.
    pub misses: u64,
    /// Answers held now (bounded by [`CacheLimits::entries`]).
    pub entries: u64,
    /// Their estimated bytes (bounded by [`CacheLimits::bytes`]).
    pub bytes: u64,
    /// Answers dropped to stay within the limits, so far.
    pub evicted: u64,
    /// Files blazesym holds open and parsed now (bounded by [`CacheLimits::open_files`]).
    pub open_files: u64,
    /// Failed attempts to read a process's file, so far, indexed by [`Unreadable`].
    pub unreadable: [u64; Unreadable::ALL.len()],
}

impl CacheStats {
    /// Failed attempts to read a process's file for `reason`, so far.
    pub fn unreadable(&self, reason: Unreadable) -> u64 {
        self.unreadable[reason as usize]
    }
}

/// What answers belong to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Object {
    Kernel,
    File(FileKey),
}

/// A mapping of a process; the device and inode tell an exec at the same address apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MappingKey {
    pid: u32,
    start: u64,
    dev: u64,
    inode: u64,
}

impl MappingKey {
    fn of(pid: u32, map: &MapEntry) -> Self {
        Self {
            pid,
            start: map.start,
            dev: map.dev,
            inode: map.inode,
        }
    }
}

/// What a process mapping's file turned out to be.
enum Mapping {
    /// Found, at `file.path`.
    Found { file: MappedFile, object: Object },
    /// Not readable; tried again when the interval count reaches `retry_at`.
    Failed { retry_at: u64 },
}

/// A file blazesym holds open, the path it opened it through (the file's own, or its debug
/// file's), where its names come from, and when it was last used.
struct OpenFile {
    path: PathBuf,
    names: NameSource,
    pid: u32,
    last_used: u64,
}

/// Symbolizes kernel addresses and user file offsets, caching the answers within
/// [`CacheLimits`].
pub struct Symbolizer {
    blazesym: Blazesym,
    limits: CacheLimits,
    /// Whether files with DWARF are read for source files and lines.
    native_lines: bool,
    answers: SymbolCache<Object>,
    /// Each process mapping's file, found once per process.
    mappings: HashMap<MappingKey, Mapping>,
    /// The files blazesym holds, at most `limits.open_files`.
    open_files: HashMap<FileKey, OpenFile>,
    /// Counts uses of `open_files`: their clock.
    open_clock: u64,
    /// Intervals ended so far.
    interval: u64,
    /// The kernel's symbols are tried again from this interval on.
    kernel_retry_at: u64,
    warned_permission_denied: bool,
    stats: CacheStats,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// A symbolizer with empty caches and the default limits.
    pub fn new() -> Self {
        Self::with_limits(CacheLimits::default())
    }

    /// A symbolizer with empty caches that keeps within `limits`.
    pub fn with_limits(limits: CacheLimits) -> Self {
        Self {
            blazesym: Blazesym::new(),
            limits,
            native_lines: false,
            answers: SymbolCache::new(),
            mappings: HashMap::new(),
            open_files: HashMap::new(),
            open_clock: 0,
            interval: 0,
            kernel_retry_at: 0,
            warned_permission_denied: false,
            stats: CacheStats::default(),
        }
    }

    /// Reads the DWARF of files that carry it for the source file and line of each address
    /// (`false`, the default: names only, from the symbol tables).
    pub fn with_native_lines(mut self, native_lines: bool) -> Self {
        self.native_lines = native_lines;
        self
    }

    /// The counters so far and the caches' size now.
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes, evicted) = self.answers.usage();
        CacheStats {
            entries: entries as u64,
            bytes: bytes as u64,
            evicted,
            open_files: self.open_files.len() as u64,
            ..self.stats
        }
    }

    /// Resolves every kernel address of `addresses` not resolved before.
    pub fn prepare_kernel(&mut self, addresses: &HashSet<u64>) {
        if self.interval < self.kernel_retry_at {
            return;
        }
        let missing = self.missing(&Object::Kernel, addresses);
        if missing.is_empty() {
            return;
        }
        let source = Source::Kernel(Kernel::default());
        match symbolize(&self.blazesym, &source, Input::AbsAddr(&missing)) {
            Ok(symbols) => {
                for (&address, symbol) in missing.iter().zip(symbols) {
                    self.answers.insert(&Object::Kernel, address, symbol);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "cannot symbolize kernel addresses; trying again later");
                self.kernel_retry_at = self.interval + RETRY_AFTER_INTERVALS;
            }
        }
    }

    /// The symbol of a kernel address resolved by [`Symbolizer::prepare_kernel`].
    pub fn kernel(&self, address: u64) -> Option<&Symbol> {
        self.answers.get(&Object::Kernel, address)
    }

    /// Resolves every file offset of `offsets` in the file that `map` of process `pid` maps,
    /// not resolved before. The file is found once per process mapping, through
    /// /proc/PID/map_files while the process runs (see [`Unreadable`] for when it is not).
    pub fn prepare_user(&mut self, pid: u32, map: &MapEntry, offsets: &HashSet<u64>) {
        let key = MappingKey::of(pid, map);
        let retry = match self.mappings.get(&key) {
            None => true,
            Some(Mapping::Failed { retry_at }) => *retry_at <= self.interval,
            Some(Mapping::Found { .. }) => false,
        };
        if retry {
            let mapping = match mapped_file::find(pid, map) {
                Ok(file) => Mapping::Found {
                    object: Object::File(file.key.clone()),
                    file,
                },
                Err(reason) => self.failed(pid, &map.path, reason),
            };
            self.mappings.insert(key, mapping);
        }
        let Some(Mapping::Found { file, object }) = self.mappings.get(&key) else {
            return;
        };
        let (file, object) = (file.clone(), object.clone());
        let missing = self.missing(&object, offsets);
        if missing.is_empty() {
            return;
        }
        let names = match self.open_files.get(&file.key) {
            Some(open) => open.names.clone(),
            None => NameSource::of(
                &file.path,
                file.key.build_id.as_deref(),
                pid,
                self.native_lines,
            ),
        };
        match symbolize_file(&self.blazesym, &file.path, &names, &missing) {
            Ok(symbols) => {
                for (&offset, symbol) in missing.iter().zip(symbols) {
                    self.answers.insert(&object, offset, symbol);
                }
                self.opened(&file, names, pid);
            }
            Err(error) => {
                tracing::debug!(pid, path = %file.path.display(), %error, "cannot symbolize");
                close(&mut self.blazesym, opened_path(&file.path, &names));
                let reason = Unreadable::of_blazesym(&error, pid);
                let failed = self.failed(pid, &map.path, reason);
                self.mappings.insert(key, failed);
            }
        }
    }

    /// The symbol at `offset` of the file `map` of process `pid` maps, resolved by
    /// [`Symbolizer::prepare_user`].
    pub fn user(&self, pid: u32, map: &MapEntry, offset: u64) -> Option<&Symbol> {
        match self.mappings.get(&MappingKey::of(pid, map))? {
            Mapping::Found { object, .. } => self.answers.get(object, offset),
            Mapping::Failed { .. } => None,
        }
    }

    /// The GNU build id (lowercase hex) of the file `map` of process `pid` maps, when
    /// [`Symbolizer::prepare_user`] found the file and it has one.
    pub fn build_id(&self, pid: u32, map: &MapEntry) -> Option<&str> {
        match self.mappings.get(&MappingKey::of(pid, map))? {
            Mapping::Found { file, .. } => file.key.build_id.as_deref(),
            Mapping::Failed { .. } => None,
        }
    }

    /// Forgets the mappings of processes that have exited, and closes the files blazesym
    /// opened through them. The answers stay cached, under their files.
    pub fn forget_processes(&mut self, exited: &HashSet<u32>) {
        self.mappings.retain(|key, _| !exited.contains(&key.pid));
        let blazesym = &mut self.blazesym;
        self.open_files.retain(|_, open| {
            let keep = !exited.contains(&open.pid);
            if !keep {
                close(blazesym, &open.path);
            }
            keep
        });
    }

    /// Ends an interval: drops the least recently used answers beyond the limits, and moves
    /// the clock that failed files are retried by.
    pub fn end_interval(&mut self) {
        self.answers.end_interval(&self.limits);
        self.interval += 1;
    }

    /// The addresses of `wanted` with no answer yet for `object`, counting hits and misses.
    fn missing(&mut self, object: &Object, wanted: &HashSet<u64>) -> Vec<u64> {
        let missing = self.answers.missing(object, wanted);
        self.stats.hits += (wanted.len() - missing.len()) as u64;
        self.stats.misses += missing.len() as u64;
        missing
    }

    /// Counts a file of `pid` that could not be read, and says when to try again.
    fn failed(&mut self, pid: u32, path: &str, reason: Unreadable) -> Mapping {
        self.stats.unreadable[reason as usize] += 1;
        if reason == Unreadable::PermissionDenied && !self.warned_permission_denied {
            self.warned_permission_denied = true;
            tracing::warn!(
                pid,
                path,
                "permission denied reading a process's file: its frames stay unsymbolized \
                 (see docs/operations.md, Privileges); counted as \
                 router_symbol_files_unreadable_total{{reason=\"permission_denied\"}}"
            );
        } else {
            tracing::debug!(pid, path, %reason, "cannot read a process's file");
        }
        Mapping::Failed {
            retry_at: self.interval + RETRY_AFTER_INTERVALS,
        }
    }

    /// Notes that blazesym holds `file` (opened through a path of `pid`, or its debug file),
    /// closing the least recently used file beyond [`CacheLimits::open_files`].
    fn opened(&mut self, file: &MappedFile, names: NameSource, pid: u32) {
        self.open_clock += 1;
        let now = self.open_clock;
        let path = opened_path(&file.path, &names).to_owned();
        if let Some(open) = self.open_files.get_mut(&file.key) {
            open.last_used = now;
            open.pid = pid;
            if open.path != path {
                // blazesym shares one parsed file between the paths that reach it: the
                // new path holds it now, the old one can go.
                let old = std::mem::replace(&mut open.path, path);
                close(&mut self.blazesym, &old);
            }
            return;
        }
        self.open_files.insert(
            file.key.clone(),
            OpenFile {
                path,
                names,
                pid,
                last_used: now,
            },
        );
        while self.open_files.len() > self.limits.open_files {
            let oldest = self
                .open_files
                .iter()
                .min_by_key(|(_, open)| open.last_used)
                .map(|(key, _)| key.clone())
                .expect("more files than the limit");
            let open = self.open_files.remove(&oldest).expect("found above");
            close(&mut self.blazesym, &open.path);
        }
    }
}

/// Makes blazesym drop what it holds of the file at `path` (its descriptor, its mapping and
/// what it parsed).
fn close(blazesym: &mut Blazesym, path: &Path) {
    // Evicting an ELF file cannot fail.
    let _ = blazesym.evict(&Evict::Elf(evict::Elf::new(path)));
}

/// The path blazesym opens for the names of the file at `path`.
fn opened_path<'a>(path: &'a Path, names: &'a NameSource) -> &'a Path {
    match names {
        NameSource::Own { .. } => path,
        NameSource::DebugFile { path, .. } => path,
    }
}

/// The symbols at `offsets` of the file at `path`, from where its names come from.
fn symbolize_file(
    blazesym: &Blazesym,
    path: &Path,
    names: &NameSource,
    offsets: &[u64],
) -> Result<Vec<Option<Symbol>>, blazesym::Error> {
    match names {
        NameSource::Own { dwarf, .. } => {
            let mut elf = Elf::new(path);
            elf.debug_syms = *dwarf;
            symbolize(blazesym, &Source::Elf(elf), Input::FileOffset(offsets))
        }
        NameSource::DebugFile { path, segments } => {
            let mut elf = Elf::new(path);
            elf.debug_syms = false;
            let addresses: Vec<Option<u64>> = offsets
                .iter()
                .map(|&offset| NameSource::address_of(segments, offset))
                .collect();
            let known: Vec<u64> = addresses.iter().flatten().copied().collect();
            let mut symbols =
                symbolize(blazesym, &Source::Elf(elf), Input::VirtOffset(&known))?.into_iter();
            Ok(addresses
                .iter()
                .map(|address| address.and_then(|_| symbols.next().flatten()))
                .collect())
        }
    }
}

/// The answers of blazesym for `input` in `source`, one per address.
fn symbolize(
    blazesym: &Blazesym,
    source: &Source<'_>,
    input: Input<&[u64]>,
) -> Result<Vec<Option<Symbol>>, blazesym::Error> {
    let results = blazesym.symbolize(source, input)?;
    Ok(results.iter().map(to_symbol).collect())
}

fn to_symbol(result: &Symbolized<'_>) -> Option<Symbol> {
    let sym = result.as_sym()?;
    let code = sym.code_info.as_deref();
    Some(Symbol {
        name: sym.name.to_string(),
        file: code.map(|c| match &c.dir {
            Some(dir) => dir.join(&*c.file).to_string_lossy().into_owned(),
            None => c.file.to_string_lossy().into_owned(),
        }),
        line: code.and_then(|c| c.line).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::MetadataExt};

    use super::mapped_file;

    use super::*;
    use crate::process::ProcessInfo;

    /// This process's libc mapping and the file offset of `getpid` in it.
    fn libc_getpid() -> (MapEntry, u64) {
        let address = libc::getpid as *const () as u64;
        let process = ProcessInfo::read(std::process::id()).unwrap();
        let map = process.mapping_of(address).unwrap().clone();
        assert!(map.path.contains("libc"), "{map:?}");
        let offset = map.file_offset(address);
        (map, offset)
    }

    #[test]
    fn a_stripped_library_is_named_from_its_debug_files_symbol_table_without_its_dwarf() {
        use object::{Object, ObjectSymbol, SymbolKind};
        let (libc_map, _) = libc_getpid();
        let libc = mapped_file::find(std::process::id(), &libc_map).unwrap();
        let names = NameSource::of(
            &libc.path,
            libc.key.build_id.as_deref(),
            std::process::id(),
            false,
        );
        let NameSource::DebugFile { path, segments } = &names else {
            panic!("libc has a debug file (scripts/setup.sh --test installs libc6-dbg): {names:?}");
        };
        // A function of libc's own, in no dynamic symbol table: only the debug file names it.
        let bytes = fs::read(path).unwrap();
        let debug = object::File::parse(&*bytes).unwrap();
        let local = debug
            .symbols()
            .find(|s| {
                s.kind() == SymbolKind::Text && s.is_local() && s.size() > 64 && s.name().is_ok()
            })
            .unwrap();
        let address = local.address() + 16;
        let segment = segments
            .iter()
            .find(|s| (s.address..s.address + s.file_size).contains(&address))
            .unwrap();
        let offset = address - segment.address + segment.file_offset;
        let mut symbolizer = Symbolizer::new();
        symbolizer.prepare_user(std::process::id(), &libc_map, &HashSet::from([offset]));
        let symbol = symbolizer.user(std::process::id(), &libc_map, offset);
        assert_eq!(
            symbol.map(|s| s.name.as_str()),
            Some(local.name().unwrap()),
            "{symbol:?}"
        );
        assert_eq!(symbolizer.stats().open_files, 1);
    }

    #[test]
    fn source_lines_of_a_binary_with_dwarf_come_only_when_asked_for() {
        // This test binary is built with DWARF and keeps its symbol table.
        let address =
            source_lines_of_a_binary_with_dwarf_come_only_when_asked_for as *const () as u64;
        let process = ProcessInfo::read(std::process::id()).unwrap();
        let map = process.mapping_of(address).unwrap().clone();
        let offset = map.file_offset(address);
        let symbol_of = |symbolizer: &mut Symbolizer| {
            symbolizer.prepare_user(std::process::id(), &map, &HashSet::from([offset]));
            symbolizer
                .user(std::process::id(), &map, offset)
                .cloned()
                .unwrap()
        };
        let names_only = symbol_of(&mut Symbolizer::new());
        assert!(
            names_only.name.contains("source_lines_of_a_binary"),
            "{names_only:?}"
        );
        assert_eq!((names_only.file.as_deref(), names_only.line), (None, 0));
        let with_lines = symbol_of(&mut Symbolizer::new().with_native_lines(true));
        assert_eq!(with_lines.name, names_only.name);
        assert!(
            with_lines
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("symbolize/mod.rs"))
                && with_lines.line > 0,
            "{with_lines:?}"
        );
    }

    #[test]
    fn a_file_that_could_not_be_read_is_tried_again_later() {
        let (libc_map, offset) = libc_getpid();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libc.so.6");
        let hidden = dir.path().join("elsewhere");
        fs::copy(&libc_map.path, &path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        // A mapping of a process (this one) whose file is, for a while, not at its path.
        let map = MapEntry {
            start: 0x1000,
            end: 0x2000,
            dev: mapped_file::dev_of(&meta),
            inode: meta.ino(),
            path: path.to_str().unwrap().to_owned(),
            ..libc_map
        };
        let me = std::process::id();
        let wanted = HashSet::from([offset]);
        let mut symbolizer = Symbolizer::new();

        fs::rename(&path, &hidden).unwrap();
        symbolizer.prepare_user(me, &map, &wanted);
        assert_eq!(symbolizer.user(me, &map, offset), None);
        assert_eq!(symbolizer.stats().unreadable(Unreadable::FileGone), 1);

        fs::rename(&hidden, &path).unwrap();
        for _ in 1..RETRY_AFTER_INTERVALS {
            symbolizer.end_interval();
            symbolizer.prepare_user(me, &map, &wanted);
            assert_eq!(symbolizer.user(me, &map, offset), None, "retried too soon");
        }
        symbolizer.end_interval();
        symbolizer.prepare_user(me, &map, &wanted);
        let name = &symbolizer.user(me, &map, offset).expect("tried again").name;
        assert!(name.contains("getpid"), "{name}");
        assert_eq!(symbolizer.stats().unreadable(Unreadable::FileGone), 1);
        assert!(symbolizer.build_id(me, &map).is_some());
    }
}
