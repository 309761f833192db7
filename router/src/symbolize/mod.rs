//! Symbolization, once, in the router, with blazesym: kernel frames through kallsyms (or a
//! vmlinux), user frames through the ELF symbols (and DWARF lines when present) of the file
//! each address maps to. Results are cached per file (device + inode) and file offset, so an
//! address is symbolized once for the life of the agent, not once per sample.

pub mod perf_map;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use blazesym::symbolize::{
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer as Blazesym,
};

use crate::process::MapEntry;

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

/// What the router knows about one executable file.
#[derive(Default)]
struct FileSymbols {
    build_id: Option<String>,
    by_offset: HashMap<u64, Option<Symbol>>,
}

/// Cache hit and miss counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that went to blazesym.
    pub misses: u64,
}

/// Symbolizes kernel addresses and user file offsets, caching every answer.
pub struct Symbolizer {
    blazesym: Blazesym,
    /// Files blazesym has opened since it was last replaced.
    files_opened: usize,
    kernel: HashMap<u64, Option<Symbol>>,
    files: HashMap<(u64, u64), FileSymbols>,
    stats: CacheStats,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// A symbolizer with empty caches.
    pub fn new() -> Self {
        Self {
            blazesym: Blazesym::new(),
            files_opened: 0,
            kernel: HashMap::new(),
            files: HashMap::new(),
            stats: CacheStats::default(),
        }
    }

    /// The cache counters so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Resolves every kernel address of `addresses` not resolved before.
    pub fn prepare_kernel(&mut self, addresses: &HashSet<u64>) {
        let source = Source::Kernel(Kernel::default());
        resolve_missing(
            &self.blazesym,
            &source,
            |a| Input::AbsAddr(a),
            addresses,
            &mut self.kernel,
            &mut self.stats,
        );
    }

    /// The symbol of a kernel address resolved by [`Symbolizer::prepare_kernel`].
    pub fn kernel(&self, address: u64) -> Option<&Symbol> {
        self.kernel.get(&address)?.as_ref()
    }

    /// Resolves every file offset of `offsets` in the file of `map` not resolved before.
    /// `readable_path` is where the router can open the file (for example through
    /// /proc/PID/root for a process in another mount namespace).
    pub fn prepare_file(&mut self, map: &MapEntry, readable_path: &Path, offsets: &HashSet<u64>) {
        // blazesym keeps every file it parsed mapped, for the agent's life: on a host that
        // runs hundreds of binaries that is resident memory without bound. Its caches start
        // afresh every `BLAZESYM_FILES` files it is asked about; the answers it gave stay
        // cached here.
        let file = self
            .files
            .entry((map.dev, map.inode))
            .or_insert_with(|| FileSymbols {
                build_id: read_build_id(readable_path),
                by_offset: HashMap::new(),
            });
        if offsets.iter().any(|o| !file.by_offset.contains_key(o)) {
            self.files_opened += 1;
            if self.files_opened > BLAZESYM_FILES {
                self.blazesym = Blazesym::new();
                self.files_opened = 1;
            }
        }
        let source = Source::Elf(Elf::new(readable_path));
        resolve_missing(
            &self.blazesym,
            &source,
            |o| Input::FileOffset(o),
            offsets,
            &mut file.by_offset,
            &mut self.stats,
        );
    }

    /// The symbol at `offset` of the file of `map`, resolved by [`Symbolizer::prepare_file`].
    pub fn user(&self, map: &MapEntry, offset: u64) -> Option<&Symbol> {
        self.files
            .get(&(map.dev, map.inode))?
            .by_offset
            .get(&offset)?
            .as_ref()
    }

    /// The GNU build id (lowercase hex) of the file of `map`, when it has one.
    pub fn build_id(&self, map: &MapEntry) -> Option<&str> {
        self.files.get(&(map.dev, map.inode))?.build_id.as_deref()
    }
}

/// Files blazesym may keep open between two resets of its caches.
const BLAZESYM_FILES: usize = 32;

/// Symbolizes, in one blazesym call, the inputs of `wanted` that `cache` has no answer for yet,
/// and counts hits and misses.
fn resolve_missing(
    blazesym: &Blazesym,
    source: &Source<'_>,
    input: fn(&[u64]) -> Input<&[u64]>,
    wanted: &HashSet<u64>,
    cache: &mut HashMap<u64, Option<Symbol>>,
    stats: &mut CacheStats,
) {
    let missing: Vec<u64> = wanted
        .iter()
        .copied()
        .filter(|a| !cache.contains_key(a))
        .collect();
    stats.hits += (wanted.len() - missing.len()) as u64;
    stats.misses += missing.len() as u64;
    if missing.is_empty() {
        return;
    }
    let results = blazesym
        .symbolize(source, input(&missing))
        .unwrap_or_default();
    for (i, key) in missing.iter().enumerate() {
        cache.insert(*key, results.get(i).and_then(to_symbol));
    }
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

fn read_build_id(path: &Path) -> Option<String> {
    let id = blazesym::helper::read_elf_build_id(&path).ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}
