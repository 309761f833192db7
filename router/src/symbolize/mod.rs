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
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use blazesym::symbolize::{
    evict::{self, Evict},
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer as Blazesym,
};

pub use self::{cache::CacheLimits, mapped_file::Unreadable};
use self::{cache::SymbolCache, mapped_file::FileKey, name_source::NameSource};
use crate::{
    process::MapEntry,
    untrusted::{open::others_can_change, sealed::sealed_copy_of},
};

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

/// Bytes of sealed copies (of files a user other than root can change) held for blazesym,
/// all files together; the least recently used files are closed beyond it.
pub const COPY_BUDGET: u64 = 64 << 20;

/// What a process mapping's file turned out to be.
enum Mapping {
    /// Found: the file `key` names.
    Found { key: FileKey },
    /// Not readable; tried again when the interval count reaches `retry_at`.
    Failed { retry_at: u64 },
}

/// A file blazesym holds open: the descriptor it reads (the file's own, its debug file's,
/// or a sealed copy of either when a user other than root can change it), the
/// `/proc/self/fd/N` path it knows that descriptor by, where its names come from, and when it
/// was last used.
struct OpenFile {
    file: File,
    path: PathBuf,
    names: NameSource,
    /// Bytes of the sealed copy `file` is (0: the file itself).
    copy_bytes: u64,
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
    /// /proc/PID/map_files while the process runs (see [`Unreadable`] for when it is not),
    /// and opened as [`crate::untrusted`] says: never mapped by blazesym when a user other
    /// than root can change it (a sealed copy is, within [`COPY_BUDGET`]).
    pub fn prepare_user(&mut self, pid: u32, map: &MapEntry, offsets: &HashSet<u64>) {
        let mapping = MappingKey::of(pid, map);
        let retry = match self.mappings.get(&mapping) {
            None => true,
            Some(Mapping::Failed { retry_at }) => *retry_at <= self.interval,
            Some(Mapping::Found { .. }) => false,
        };
        let mut found_file = None;
        if retry {
            let state = match mapped_file::find(pid, map) {
                Ok((key, file)) => {
                    found_file = Some(file);
                    Mapping::Found { key }
                }
                Err(reason) => self.failed(pid, &map.path, reason),
            };
            self.mappings.insert(mapping, state);
        }
        let Some(Mapping::Found { key }) = self.mappings.get(&mapping) else {
            return;
        };
        let key = key.clone();
        let object = Object::File(key.clone());
        let missing = self.missing(&object, offsets);
        if missing.is_empty() {
            return;
        }
        let held = match self.open_files.get(&key) {
            Some(open) => Ok((open.path.clone(), open.names.clone())),
            None => found_file
                .map_or_else(|| mapped_file::open(pid, map), Ok)
                .and_then(|file| self.hold(&key, file, pid)),
        };
        let symbols = held.and_then(|(path, names)| {
            symbolize_file(&self.blazesym, &path, &names, &missing).map_err(|error| {
                tracing::debug!(pid, path = %map.path, %error, "cannot symbolize");
                Unreadable::of_blazesym(&error, pid)
            })
        });
        match symbols {
            Ok(symbols) => {
                for (&offset, symbol) in missing.iter().zip(symbols) {
                    self.answers.insert(&object, offset, symbol);
                }
                self.touch(&key, pid);
            }
            Err(reason) => {
                if let Some(open) = self.open_files.remove(&key) {
                    close(&mut self.blazesym, open);
                }
                let failed = self.failed(pid, &map.path, reason);
                self.mappings.insert(mapping, failed);
            }
        }
    }

    /// The symbol at `offset` of the file `map` of process `pid` maps, resolved by
    /// [`Symbolizer::prepare_user`].
    pub fn user(&self, pid: u32, map: &MapEntry, offset: u64) -> Option<&Symbol> {
        match self.mappings.get(&MappingKey::of(pid, map))? {
            Mapping::Found { key } => self.answers.get(&Object::File(key.clone()), offset),
            Mapping::Failed { .. } => None,
        }
    }

    /// The GNU build id (lowercase hex) of the file `map` of process `pid` maps, when
    /// [`Symbolizer::prepare_user`] found the file and it has one.
    pub fn build_id(&self, pid: u32, map: &MapEntry) -> Option<&str> {
        match self.mappings.get(&MappingKey::of(pid, map))? {
            Mapping::Found { key } => key.build_id.as_deref(),
            Mapping::Failed { .. } => None,
        }
    }

    /// Forgets the mappings of processes that have exited, and closes the files blazesym
    /// opened for them last. The answers stay cached, under their files.
    pub fn forget_processes(&mut self, exited: &HashSet<u32>) {
        self.mappings.retain(|key, _| !exited.contains(&key.pid));
        let gone: Vec<FileKey> = self
            .open_files
            .iter()
            .filter(|(_, open)| exited.contains(&open.pid))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let open = self.open_files.remove(&key).expect("listed above");
            close(&mut self.blazesym, open);
        }
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

    /// Finds where the names of `file` (the file `key` names, opened for `pid`) come from,
    /// and holds what blazesym is to read for them open: the file or its debug file, as a
    /// sealed copy when a user other than root can change it. Closes the least recently used
    /// files beyond [`CacheLimits::open_files`] and [`COPY_BUDGET`].
    fn hold(
        &mut self,
        key: &FileKey,
        file: File,
        pid: u32,
    ) -> Result<(PathBuf, NameSource), Unreadable> {
        let (names, names_file) =
            NameSource::of(file, key.build_id.as_deref(), pid, self.native_lines);
        let (file, copy_bytes) = match others_can_change(&names_file) {
            Ok(false) => (names_file, 0),
            Ok(true) => {
                let copy = sealed_copy_of(&names_file, "symbols", COPY_BUDGET)
                    .map_err(|e| Unreadable::of_io(e.kind(), pid))?;
                let bytes = copy.metadata().map_or(COPY_BUDGET, |m| m.len());
                (copy, bytes)
            }
            Err(error) => return Err(Unreadable::of_io(error.kind(), pid)),
        };
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        self.open_files.insert(
            key.clone(),
            OpenFile {
                file,
                path: path.clone(),
                names: names.clone(),
                copy_bytes,
                pid,
                last_used: 0,
            },
        );
        self.touch(key, pid);
        let over = |files: &HashMap<FileKey, OpenFile>| {
            files.len() > self.limits.open_files
                || files.values().map(|f| f.copy_bytes).sum::<u64>() > COPY_BUDGET
        };
        while over(&self.open_files) {
            let oldest = self
                .open_files
                .iter()
                .filter(|(other, _)| *other != key)
                .min_by_key(|(_, open)| open.last_used)
                .map(|(key, _)| key.clone());
            let Some(oldest) = oldest else { break };
            let open = self.open_files.remove(&oldest).expect("found above");
            close(&mut self.blazesym, open);
        }
        Ok((path, names))
    }

    /// Notes a use of the open file `key`, for `pid`.
    fn touch(&mut self, key: &FileKey, pid: u32) {
        self.open_clock += 1;
        if let Some(open) = self.open_files.get_mut(key) {
            open.last_used = self.open_clock;
            open.pid = pid;
        }
    }
}

/// Makes blazesym drop what it holds of `open` (its descriptor, its mapping and what it
/// parsed), then closes `open`'s descriptor: in this order, so that blazesym never finds
/// another file under a reused `/proc/self/fd/N`.
fn close(blazesym: &mut Blazesym, open: OpenFile) {
    // Evicting an ELF file cannot fail.
    let _ = blazesym.evict(&Evict::Elf(evict::Elf::new(&open.path)));
    drop(open.file);
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
        NameSource::DebugFile { segments } => {
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
        let (key, libc) = mapped_file::find(std::process::id(), &libc_map).unwrap();
        let (names, debug_file) =
            NameSource::of(libc, key.build_id.as_deref(), std::process::id(), false);
        let NameSource::DebugFile { segments } = &names else {
            panic!("libc has a debug file (scripts/setup.sh --test installs libc6-dbg): {names:?}");
        };
        // A function of libc's own, in no dynamic symbol table: only the debug file names it.
        let bytes = fs::read(format!("/proc/self/fd/{}", debug_file.as_raw_fd())).unwrap();
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
            .find(|s| (s.vaddr..s.vaddr + s.file_size).contains(&address))
            .unwrap();
        let offset = address - segment.vaddr + segment.file_offset;
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
            dev: crate::untrusted::open::device_number(&meta),
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
