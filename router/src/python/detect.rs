//! Whether a process runs CPython, and where its interpreter's anchors are in its address
//! space.
//!
//! CPython lives in `libpython3.X.so*` (pyenv's and python.org's builds, the official Docker
//! images) or in the `python3.X` executable itself (Debian's and Ubuntu's `/usr/bin/python3.X`,
//! which is also non-PIE). Either way the file exports `_PyRuntime` (the runtime state the
//! interpreters hang from), `_PyEval_EvalFrameDefault` (the eval loop) and, from 3.11,
//! `Py_Version` (`PY_VERSION_HEX` as a constant); [`detect`] reads them from the file's
//! dynamic symbols (else its full symbol table) and relocates them with the process's mapping
//! of the file. What a file says is cached, so that many processes of one Python parse it
//! once.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError},
};

use object::read::elf::ElfFile64;
use object::{Object, ObjectSegment, ObjectSymbol, ReadRef};
use unwind_table::{ElfFacts, LoadSegment};

use super::layout::{layout, PythonLayout};
use crate::{
    process::MapEntry,
    untrusted::{open::open_mapped, read::elf_bytes},
};

/// A process running a supported CPython (3.11 to 3.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PythonProcess {
    /// The minor version (3.`minor`).
    pub minor: u32,
    /// Address of `_PyRuntime` in the process.
    pub runtime_address: u64,
    /// Address of `_PyEval_EvalFrameDefault`'s first instruction in the process.
    pub eval_start: u64,
    /// One past its last instruction, from the symbol's size (GCC may have moved its cold
    /// paths to a separate `_PyEval_EvalFrameDefault.cold` block, which is not included);
    /// equal to `eval_start` when the symbol has no size.
    pub eval_end: u64,
    /// The offsets of its version.
    pub layout: &'static PythonLayout,
}

/// Finds CPython in a process, from its executable mappings (`maps`, as
/// [`crate::process::ProcessInfo`] holds them). `None` when no mapped file holds a
/// supported CPython (not Python, Python before 3.11 or after 3.13, a free-threaded or debug
/// build).
pub fn detect(pid: u32, maps: &[MapEntry]) -> Option<PythonProcess> {
    let mut tried: Vec<(u64, u64)> = Vec::new();
    for map in candidates(maps) {
        if tried.contains(&(map.dev, map.inode)) {
            continue;
        }
        tried.push((map.dev, map.inode));
        let Some(python) = python_file(pid, map) else {
            continue;
        };
        let Some(bias) = python.elf.bias(map.start, map.offset) else {
            continue;
        };
        return Some(PythonProcess {
            minor: python.minor,
            runtime_address: python.runtime.wrapping_add(bias),
            eval_start: python.eval_start.wrapping_add(bias),
            eval_end: python
                .eval_start
                .wrapping_add(python.eval_size)
                .wrapping_add(bias),
            layout: python.layout,
        });
    }
    None
}

/// The mappings that may hold CPython: `libpython*` first, then `python*` executables.
fn candidates(maps: &[MapEntry]) -> impl Iterator<Item = &MapEntry> {
    let named = |library: bool| {
        maps.iter().filter(move |map| {
            map.is_file() && {
                let name = file_name(&map.path);
                if library {
                    name.starts_with("libpython")
                } else {
                    name.starts_with("python")
                }
            }
        })
    };
    named(true).chain(named(false))
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// What a file holding CPython says.
#[derive(Debug)]
struct PythonFile {
    minor: u32,
    layout: &'static PythonLayout,
    /// Virtual addresses in the file (before relocation).
    runtime: u64,
    eval_start: u64,
    eval_size: u64,
    /// Its `PT_LOAD` segments, for the bias.
    elf: ElfFacts,
}

/// A file as `stat` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    inode: u64,
    size: u64,
    mtime_ns: i64,
}

/// Files examined (`None`: not a supported CPython). Emptied when full.
static FILES: LazyLock<Mutex<HashMap<FileKey, Option<Arc<PythonFile>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const CACHED_FILES: usize = 256;

/// The cache, usable even if a thread panicked holding it (it only holds finished entries).
fn files() -> MutexGuard<'static, HashMap<FileKey, Option<Arc<PythonFile>>>> {
    FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

fn python_file(pid: u32, map: &MapEntry) -> Option<Arc<PythonFile>> {
    let file = open_mapped(pid, map).ok()?;
    let meta = file.metadata().ok()?;
    let key = FileKey {
        dev: meta.dev(),
        inode: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    };
    if let Some(known) = files().get(&key) {
        return known.clone();
    }
    // Read with `pread`, not mapped: the file may be one its owner truncates under us.
    let data = elf_bytes(file).ok()?;
    let python = examine(&data, file_name(&map.path)).map(Arc::new);
    if python.is_none() {
        tracing::debug!(pid, path = %map.path, "not a supported CPython");
    }
    let mut files = files();
    if files.len() >= CACHED_FILES {
        files.clear();
    }
    files.insert(key, python.clone());
    python
}

/// The minor version, anchors and segments of an ELF file holding CPython 3.11 to 3.13;
/// `name` (its file name) gives the version when it has no `Py_Version`.
fn examine<'data, R: ReadRef<'data>>(data: R, name: &str) -> Option<PythonFile> {
    let named = name_version(name);
    if named.is_some_and(|n| !n.supported_build) {
        return None;
    }
    let elf = ElfFile64::<object::Endianness, R>::parse(data).ok()?;
    let symbols = find_symbols(&elf);
    let runtime = symbols.runtime?;
    let (eval_start, eval_size) = symbols.eval?;
    let segments: Vec<LoadSegment> = elf
        .segments()
        .map(|segment| {
            let (file_offset, file_size) = segment.file_range();
            LoadSegment {
                file_offset,
                vaddr: segment.address(),
                file_size,
                executable: segment_flags(&segment) & object::elf::PF_X != 0,
            }
        })
        .collect();
    let version = symbols
        .version
        .and_then(|address| read_vaddr(data, &segments, address, 4))
        .map(|bytes| u32::from_le_bytes(bytes.try_into().unwrap_or_default()));
    let minor = match version {
        Some(hex) if hex >> 24 == 3 => (hex >> 16) & 0xff,
        Some(_) => return None,
        None => named?.minor,
    };
    let layout = layout(minor)?;
    if minor >= 13 {
        let offsets = read_vaddr(data, &segments, runtime, DEBUG_OFFSETS_LEN)?;
        if !debug_offsets_agree(offsets, layout) {
            return None;
        }
    }
    Some(PythonFile {
        minor,
        layout,
        runtime,
        eval_start,
        eval_size,
        elf: ElfFacts {
            segments,
            ..ElfFacts::default()
        },
    })
}

fn segment_flags<'data>(segment: &impl ObjectSegment<'data>) -> u32 {
    match segment.flags() {
        object::SegmentFlags::Elf { p_flags } => p_flags,
        _ => 0,
    }
}

#[derive(Default)]
struct Symbols {
    runtime: Option<u64>,
    eval: Option<(u64, u64)>,
    version: Option<u64>,
}

/// `_PyRuntime`, `_PyEval_EvalFrameDefault` (address, size) and `Py_Version` from the
/// dynamic symbols, then (for what is still missing) the symbol table.
fn find_symbols<'data, R: ReadRef<'data>>(
    elf: &ElfFile64<'data, object::Endianness, R>,
) -> Symbols {
    let mut found = Symbols::default();
    for symbols in [elf.dynamic_symbols(), elf.symbols()] {
        for symbol in symbols {
            if symbol.is_undefined() || symbol.address() == 0 {
                continue;
            }
            match symbol.name_bytes() {
                Ok(b"_PyRuntime") => found.runtime = found.runtime.or(Some(symbol.address())),
                Ok(b"_PyEval_EvalFrameDefault") => {
                    found.eval = found.eval.or(Some((symbol.address(), symbol.size())));
                }
                Ok(b"Py_Version") => found.version = found.version.or(Some(symbol.address())),
                _ => {}
            }
        }
        if found.runtime.is_some() && found.eval.is_some() && found.version.is_some() {
            break;
        }
    }
    found
}

/// `len` bytes of the file at virtual address `vaddr` (in a segment's file-backed part).
fn read_vaddr<'data, R: ReadRef<'data>>(
    data: R,
    segments: &[LoadSegment],
    vaddr: u64,
    len: u64,
) -> Option<&'data [u8]> {
    let segment = segments.iter().find(|s| {
        vaddr >= s.vaddr
            && vaddr
                .checked_add(len)
                .is_some_and(|end| end <= s.vaddr + s.file_size)
    })?;
    data.read_bytes_at(vaddr - segment.vaddr + segment.file_offset, len)
        .ok()
}

/// What a file name says of the CPython in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NamedVersion {
    minor: u32,
    /// Whether its ABI flags (`t`: free-threaded, `d`: debug) leave the default layout.
    supported_build: bool,
}

/// `libpython3.12.so.1.0` → 12; `python3.11` → 11; `libpython3.13t.so` → 13, free-threaded.
fn name_version(name: &str) -> Option<NamedVersion> {
    let rest = name
        .strip_prefix("libpython3.")
        .or_else(|| name.strip_prefix("python3."))?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let minor = rest[..digits].parse().ok()?;
    let flags = rest[digits..].split('.').next().unwrap_or("");
    Some(NamedVersion {
        minor,
        supported_build: flags.is_empty(),
    })
}

/// The first fields of 3.13's `_Py_DebugOffsets` (at the start of `_PyRuntime`, initialized
/// in the file's data), as u64s: up to the code object's offsets.
const DEBUG_OFFSETS_LEN: u64 = 44 * 8;

/// Whether the `_Py_DebugOffsets` a 3.13 runtime starts with describe a default build laid
/// out as `layout` says (they describe the build the file is, where the headers describe the
/// build they came with).
fn debug_offsets_agree(offsets: &[u8], layout: &PythonLayout) -> bool {
    let field = |index: usize| {
        offsets
            .get(index * 8..index * 8 + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if offsets.get(..8) != Some(b"xdebugpy".as_slice()) {
        return false;
    }
    let version = field(1).unwrap_or(0);
    let expected = [
        (2, 0), // free_threaded
        (5, u64::from(layout.runtime_interpreters_head)),
        (9, u64::from(layout.interp_threads_head)),
        (21, u64::from(layout.tstate_next)),
        (23, u64::from(layout.cframe_current_frame)),
        (25, u64::from(layout.tstate_native_thread_id)),
        (29, u64::from(layout.frame_previous)),
        (30, u64::from(layout.frame_code)),
        (31, u64::from(layout.frame_instr)),
        (33, u64::from(layout.frame_owner)),
        (35, u64::from(layout.code_filename)),
        (36, u64::from(layout.code_name)),
        (37, u64::from(layout.code_qualname)),
        (38, u64::from(layout.code_linetable)),
        (39, u64::from(layout.code_firstlineno)),
        (43, u64::from(layout.code_adaptive)),
    ];
    let agree = version >> 16 == (0x0300 | u64::from(layout.minor))
        && expected
            .iter()
            .all(|&(index, value)| field(index) == Some(value));
    if !agree {
        tracing::debug!(
            version,
            "_Py_DebugOffsets disagree with the 3.{} layout",
            layout.minor
        );
    }
    agree
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn versions_from_names() {
        let v = |name| name_version(name).map(|n| (n.minor, n.supported_build));
        assert_eq!(v("libpython3.12.so.1.0"), Some((12, true)));
        assert_eq!(v("libpython3.11.so"), Some((11, true)));
        assert_eq!(v("python3.11"), Some((11, true)));
        assert_eq!(v("libpython3.13t.so.1.0"), Some((13, false)));
        assert_eq!(v("python3.13t"), Some((13, false)));
        assert_eq!(v("libpython3.11d.so.1.0"), Some((11, false)));
        assert_eq!(v("python3"), None);
        assert_eq!(v("libpython2.7.so.1.0"), None);
        assert_eq!(v("pythonista"), None);
    }

    #[test]
    fn candidates_libraries_first() {
        let map = |path: &str, inode| MapEntry {
            start: 0,
            end: 0,
            offset: 0,
            dev: 1,
            inode,
            path: path.to_owned(),
        };
        let maps = [
            map("/usr/bin/python3.12", 1),
            map("/usr/lib/libc.so.6", 2),
            map("/usr/lib/libpython3.12.so.1.0", 3),
            map("[vdso]", 0),
        ];
        let paths: Vec<_> = candidates(&maps).map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/usr/lib/libpython3.12.so.1.0", "/usr/bin/python3.12"]
        );
    }

    /// The files installed here (tests skip those that are not).
    fn examine_file(path: &str) -> Option<PythonFile> {
        let data = fs::read(path).ok()?;
        Some(
            examine(data.as_slice(), file_name(path))
                .unwrap_or_else(|| panic!("{path}: not examined")),
        )
    }

    #[test]
    fn installed_pythons() {
        let pyenv = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".to_owned());
        let mut seen = 0;
        for (path, minor) in [
            ("/usr/bin/python3.11".to_owned(), 11),
            (
                format!("{pyenv}/versions/3.11.7/lib/libpython3.11.so.1.0"),
                11,
            ),
            (
                format!("{pyenv}/versions/3.12.1/lib/libpython3.12.so.1.0"),
                12,
            ),
            (
                format!("{pyenv}/versions/3.13.0/lib/libpython3.13.so.1.0"),
                13,
            ),
        ] {
            let Some(python) = examine_file(&path) else {
                eprintln!("{path} not installed");
                continue;
            };
            seen += 1;
            assert_eq!(python.minor, minor, "{path}");
            assert!(python.eval_size > 0, "{path}");
            assert!(python.runtime > 0, "{path}");
        }
        if seen == 0 {
            eprintln!("no CPython installed to examine");
        }
        // 3.10 has no layout; the executable of a shared-library build has no runtime.
        for path in [
            format!("{pyenv}/versions/3.10.13/lib/libpython3.10.so.1.0"),
            format!("{pyenv}/versions/3.12.1/bin/python3.12"),
        ] {
            if let Ok(data) = fs::read(&path) {
                assert!(
                    examine(data.as_slice(), file_name(&path)).is_none(),
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn debug_offsets_must_match() {
        let layout = layout(13).unwrap();
        let mut offsets = vec![0u8; DEBUG_OFFSETS_LEN as usize];
        let mut set = |index: usize, value: u64| {
            offsets[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
        };
        set(1, 0x030d_00f0);
        for (index, value) in [
            (5, layout.runtime_interpreters_head),
            (9, layout.interp_threads_head),
            (21, layout.tstate_next),
            (23, layout.cframe_current_frame),
            (25, layout.tstate_native_thread_id),
            (29, layout.frame_previous),
            (30, layout.frame_code),
            (31, layout.frame_instr),
            (33, layout.frame_owner),
            (35, layout.code_filename),
            (36, layout.code_name),
            (37, layout.code_qualname),
            (38, layout.code_linetable),
            (39, layout.code_firstlineno),
            (43, layout.code_adaptive),
        ] {
            set(index, u64::from(value));
        }
        offsets[..8].copy_from_slice(b"xdebugpy");
        assert!(debug_offsets_agree(&offsets, layout));
        let mut free_threaded = offsets.clone();
        free_threaded[16] = 1;
        assert!(!debug_offsets_agree(&free_threaded, layout));
        let mut other = offsets.clone();
        other[9 * 8] ^= 8;
        assert!(!debug_offsets_agree(&other, layout));
        assert!(!debug_offsets_agree(&offsets, self::layout(12).unwrap()));
        assert!(!debug_offsets_agree(&offsets[..100], layout));
    }
}
