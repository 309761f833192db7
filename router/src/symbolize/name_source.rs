//! Where a mapped file's function names come from: its own symbol tables (and its DWARF lines
//! when it carries DWARF), or, for a stripped file whose distribution ships a separate debug
//! file (Debian's `libc6-dbg`, the `-dbgsym` packages), the symbol table of that debug file
//! found by build id, without its DWARF. That DWARF is compressed: blazesym would decompress
//! and keep all of it (libc's: 11 MB, then 5 MB of parsed line programs) for line numbers of
//! system libraries, while the names, which are what stacks need, are in the debug file's
//! `.symtab`. A stripped file without a debug file is named from its `.dynsym`.

use std::fs::File;

use unwind_table::{elf_facts, ElfFacts, LoadSegment};

use super::mapped_file::build_id_hex;
use crate::untrusted::{
    open::{open_in_following_links, Root},
    read::elf_bytes,
};

/// Where the names of one file come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NameSource {
    /// The file itself; `dwarf`: its own DWARF is read (for lines, or for names when it has
    /// no symbol table).
    Own { dwarf: bool },
    /// The symbol table of the file's separate debug file, looked up by virtual address:
    /// the file's loadable segments translate its file offsets.
    DebugFile { segments: Vec<LoadSegment> },
}

impl NameSource {
    /// The source of the names of the ELF file `file` (mapped by process `pid`, whose root
    /// the debug file is looked for under first), with build id `build_id`, and the file to
    /// read them from (`file` itself, or its debug file); its own DWARF is read when `lines`
    /// asks for source lines, or when it has no symbol table. Anything unreadable here leaves
    /// the file to name itself.
    pub(crate) fn of(
        file: File,
        build_id: Option<&str>,
        pid: u32,
        lines: bool,
    ) -> (NameSource, File) {
        let dynamic_symbols = NameSource::Own { dwarf: false };
        let Some(elf) = facts_of(&file) else {
            return (dynamic_symbols, file);
        };
        if elf.has_symbol_table || elf.has_dwarf {
            let own = NameSource::Own {
                dwarf: elf.has_dwarf && (lines || !elf.has_symbol_table),
            };
            return (own, file);
        }
        match build_id.and_then(|id| debug_file_of(id, pid)) {
            Some(debug_file) => (
                NameSource::DebugFile {
                    segments: elf.segments,
                },
                debug_file,
            ),
            None => (dynamic_symbols, file),
        }
    }

    /// The virtual address of `file_offset` in the file (for [`NameSource::DebugFile`]).
    pub(crate) fn address_of(segments: &[LoadSegment], file_offset: u64) -> Option<u64> {
        segments
            .iter()
            .find(|s| (s.file_offset..s.file_offset + s.file_size).contains(&file_offset))
            .map(|s| file_offset - s.file_offset + s.vaddr)
    }
}

/// What the headers of `file` say (read with `pread`, within a budget).
fn facts_of(file: &File) -> Option<ElfFacts> {
    let bytes = elf_bytes(file.try_clone().ok()?).ok()?;
    elf_facts(&bytes).ok()
}

/// The debug file of build id `build_id` (lowercase hex): under
/// `/usr/lib/debug/.build-id/xx/rest.debug`, in the process's root first, then in ours; only
/// one that carries that build id and a symbol table.
fn debug_file_of(build_id: &str, pid: u32) -> Option<File> {
    if build_id.len() < 3 || !build_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let path = format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    );
    [Root::Process(pid), Root::Host]
        .into_iter()
        .filter_map(|root| open_in_following_links(root, &path).ok())
        .find(|file| {
            facts_of(file).is_some_and(|elf| {
                elf.has_symbol_table
                    && elf.build_id.as_deref().map(build_id_hex).as_deref() == Some(build_id)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_offsets_translate_through_the_segment_that_holds_them() {
        let segment = |file_offset, file_size, vaddr| LoadSegment {
            file_offset,
            file_size,
            vaddr,
            executable: false,
        };
        let segments = [segment(0, 0x25388, 0), segment(0x1cf8d0, 0x4f98, 0x1d08d0)];
        assert_eq!(NameSource::address_of(&segments, 0x100), Some(0x100));
        assert_eq!(NameSource::address_of(&segments, 0x1cf900), Some(0x1d0900));
        assert_eq!(NameSource::address_of(&segments, 0x30000), None);
    }

    #[test]
    fn a_file_with_its_own_symbols_names_itself() {
        let me = File::open(std::env::current_exe().unwrap()).unwrap();
        assert!(matches!(
            NameSource::of(me, None, std::process::id(), false).0,
            NameSource::Own { .. }
        ));
    }
}
