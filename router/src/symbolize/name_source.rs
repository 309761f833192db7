//! Where a mapped file's function names come from: its own symbol tables (and its DWARF lines
//! when it carries DWARF), or, for a stripped file whose distribution ships a separate debug
//! file (Debian's `libc6-dbg`, the `-dbgsym` packages), the symbol table of that debug file
//! found by build id, without its DWARF. That DWARF is compressed: blazesym would decompress
//! and keep all of it (libc's: 11 MB, then 5 MB of parsed line programs) for line numbers of
//! system libraries, while the names, which are what stacks need, are in the debug file's
//! `.symtab`. A stripped file without a debug file is named from its `.dynsym`.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSegment};

/// Where the names of one file come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NameSource {
    /// The file itself; `dwarf`: its own DWARF is read (for lines, or for names when it has
    /// no symbol table).
    Own { dwarf: bool },
    /// The symbol table of the file's separate debug file, at `path`, looked up by virtual
    /// address: the file's loadable segments translate its file offsets.
    DebugFile {
        path: PathBuf,
        segments: Vec<Segment>,
    },
}

/// A loadable segment of a file: `file_size` bytes at `file_offset`, mapped at `address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub file_offset: u64,
    pub file_size: u64,
    pub address: u64,
}

impl NameSource {
    /// The source of the names of the ELF file at `path` (opened through process `pid`'s
    /// paths, whose root the debug file is looked for under first), with build id
    /// `build_id`; its own DWARF is read when `lines` asks for source lines, or when it has no
    /// symbol table. Anything unreadable here leaves the file to name itself.
    pub(crate) fn of(path: &Path, build_id: Option<&str>, pid: u32, lines: bool) -> NameSource {
        let dynamic_symbols = NameSource::Own { dwarf: false };
        let Some(file) = mapped(path) else {
            return dynamic_symbols;
        };
        let Ok(elf) = object::File::parse(&*file) else {
            return dynamic_symbols;
        };
        let dwarf = elf.section_by_name(".debug_info").is_some();
        let symbols = has_symbols(&elf);
        if symbols || dwarf {
            return NameSource::Own {
                dwarf: dwarf && (lines || !symbols),
            };
        }
        let debug_file = build_id.and_then(|id| debug_file_of(id, pid));
        match debug_file {
            Some(path) => NameSource::DebugFile {
                path,
                segments: elf
                    .segments()
                    .map(|s| {
                        let (file_offset, file_size) = s.file_range();
                        Segment {
                            file_offset,
                            file_size,
                            address: s.address(),
                        }
                    })
                    .collect(),
            },
            None => dynamic_symbols,
        }
    }

    /// The virtual address of `file_offset` in the file (for [`NameSource::DebugFile`]).
    pub(crate) fn address_of(segments: &[Segment], file_offset: u64) -> Option<u64> {
        segments
            .iter()
            .find(|s| (s.file_offset..s.file_offset + s.file_size).contains(&file_offset))
            .map(|s| file_offset - s.file_offset + s.address)
    }
}

/// The file's bytes, mapped read-only.
fn mapped(path: &Path) -> Option<memmap2::Mmap> {
    let file = File::open(path).ok()?;
    // SAFETY: read-only mapping; a file truncated under us could fault, as with blazesym's
    // own mapping of the same file.
    unsafe { memmap2::Mmap::map(&file) }.ok()
}

/// Whether the ELF has a `.symtab` with symbols in it.
fn has_symbols(elf: &object::File<'_>) -> bool {
    elf.section_by_name(".symtab")
        .is_some_and(|s| s.size() > 24)
}

/// The debug file of build id `build_id` (lowercase hex): under
/// `/usr/lib/debug/.build-id/xx/rest.debug`, in the process's root first, then in ours; only
/// one with a symbol table.
fn debug_file_of(build_id: &str, pid: u32) -> Option<PathBuf> {
    if build_id.len() < 3 || !build_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let relative = format!(
        "usr/lib/debug/.build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    );
    [
        PathBuf::from(format!("/proc/{pid}/root/{relative}")),
        PathBuf::from(format!("/{relative}")),
    ]
    .into_iter()
    .find(|path| {
        mapped(path)
            .is_some_and(|bytes| object::File::parse(&*bytes).is_ok_and(|elf| has_symbols(&elf)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_offsets_translate_through_the_segment_that_holds_them() {
        let segments = [
            Segment {
                file_offset: 0,
                file_size: 0x25388,
                address: 0,
            },
            Segment {
                file_offset: 0x1cf8d0,
                file_size: 0x4f98,
                address: 0x1d08d0,
            },
        ];
        assert_eq!(NameSource::address_of(&segments, 0x100), Some(0x100));
        assert_eq!(NameSource::address_of(&segments, 0x1cf900), Some(0x1d0900));
        assert_eq!(NameSource::address_of(&segments, 0x30000), None);
    }

    #[test]
    fn a_file_with_its_own_symbols_names_itself() {
        let me = std::env::current_exe().unwrap();
        assert!(matches!(
            NameSource::of(&me, None, std::process::id(), false),
            NameSource::Own { .. }
        ));
    }
}
