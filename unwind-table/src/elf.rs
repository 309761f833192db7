//! What the crate reads from ELF headers: the file's kind, its CFI sections, its GNU build id
//! and its `PT_LOAD` segments.

use std::borrow::Cow;

use object::read::elf::ElfFile64;
use object::{
    Architecture, Endianness, FileKind, Object, ObjectSection, ObjectSegment, ReadRef, SegmentFlags,
};

use crate::TableError;

/// The page size mappings are aligned to (x86-64).
const PAGE_SIZE: u64 = 4096;

/// One `PT_LOAD` segment of an ELF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// `p_offset`: where the segment starts in the file.
    pub file_offset: u64,
    /// `p_vaddr`: the virtual address it is linked at.
    pub vaddr: u64,
    /// `p_filesz`: how many bytes of the file it maps.
    pub file_size: u64,
    /// `PF_X`: whether it holds code.
    pub executable: bool,
}

/// What the router needs to know of an ELF file besides its unwind table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfFacts {
    /// The GNU build id note's bytes, if the file has one.
    pub build_id: Option<Vec<u8>>,
    /// The `PT_LOAD` segments, in program header order.
    pub segments: Vec<LoadSegment>,
    /// Bytes of CFI (`.eh_frame` and `.debug_frame`), from which a table's size can be told
    /// before building it: about one row per 4.5 bytes (libc: 153 KB, 28 272 rows).
    pub cfi_bytes: u64,
}

impl ElfFacts {
    /// The most rows the file's table can have, from its CFI's size (an upper estimate:
    /// a row costs at least 4 bytes of CFI).
    pub fn estimated_rows(&self) -> u64 {
        self.cfi_bytes / 4
    }

    /// The bias of a process mapping of this file that starts at `map_start` and maps the
    /// file from `map_file_offset` (both from `/proc/PID/maps`): process address − bias = the
    /// file's virtual address, as the table's rows hold them.
    ///
    /// The mapping belongs to the `PT_LOAD` segment whose file range (from its page-aligned
    /// start) contains `map_file_offset`; then
    /// bias = `map_start − map_file_offset + file_offset − vaddr` (wrapping). Two segments
    /// can share a page of the file (one's tail, the next one's head), and the offset alone
    /// cannot tell their mappings apart: an executable segment is preferred (the mappings the
    /// probe unwinds are executable), then one whose page-aligned start is the offset.
    /// `None` when no segment contains the offset.
    ///
    /// ```
    /// use unwind_table::{ElfFacts, LoadSegment};
    ///
    /// let facts = ElfFacts {
    ///     build_id: None,
    ///     cfi_bytes: 0,
    ///     segments: vec![LoadSegment {
    ///         file_offset: 0x1000,
    ///         vaddr: 0x401000,
    ///         file_size: 0x2000,
    ///         executable: true,
    ///     }],
    /// };
    /// // Loaded 0x7f00_0000_0000 higher than linked.
    /// let bias = facts.bias(0x7f00_0040_1000, 0x1000).unwrap();
    /// assert_eq!(bias, 0x7f00_0000_0000);
    /// assert_eq!(facts.bias(0x7f00_0040_1000, 0x9000), None);
    /// ```
    pub fn bias(&self, map_start: u64, map_file_offset: u64) -> Option<u64> {
        let seg = self
            .segments
            .iter()
            .filter(|seg| {
                let end = seg.file_offset.saturating_add(seg.file_size);
                (align_down(seg.file_offset)..end).contains(&map_file_offset)
            })
            // `max_by_key` keeps the last of equals: reverse to keep the first.
            .rev()
            .max_by_key(|seg| {
                (
                    seg.executable,
                    align_down(seg.file_offset) == map_file_offset,
                )
            })?;
        Some(
            map_start
                .wrapping_sub(map_file_offset)
                .wrapping_add(seg.file_offset)
                .wrapping_sub(seg.vaddr),
        )
    }
}

fn align_down(offset: u64) -> u64 {
    offset & !(PAGE_SIZE - 1)
}

/// Reads the GNU build id and the `PT_LOAD` segments of an x86-64 ELF file.
///
/// # Errors
///
/// [`TableError`] when the bytes are not a readable x86-64 ELF file.
pub fn elf_facts<'data, R: ReadRef<'data>>(elf: R) -> Result<ElfFacts, TableError> {
    let file = parse_x86_64(elf)?;
    let build_id = file.build_id().map_err(TableError::MalformedElf)?;
    let segments = file
        .segments()
        .map(|segment| {
            let (file_offset, file_size) = segment.file_range();
            let executable = match segment.flags() {
                SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => false,
            };
            LoadSegment {
                file_offset,
                vaddr: segment.address(),
                file_size,
                executable,
            }
        })
        .collect();
    let cfi_bytes = [".eh_frame", ".debug_frame"]
        .iter()
        .filter_map(|name| file.section_by_name(name))
        .map(|section| section.size())
        .sum();
    Ok(ElfFacts {
        build_id: build_id.map(<[u8]>::to_vec),
        segments,
        cfi_bytes,
    })
}

/// Parses a 64-bit x86-64 ELF file.
pub(crate) fn parse_x86_64<'data, R: ReadRef<'data>>(
    elf: R,
) -> Result<ElfFile64<'data, Endianness, R>, TableError> {
    match FileKind::parse(elf) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => return Err(TableError::NotX86_64(elf32_architecture(elf))),
        Ok(other) => return Err(TableError::NotElf(format!("a {other:?} file"))),
        Err(err) => return Err(TableError::NotElf(err.to_string())),
    }
    let file = ElfFile64::parse(elf).map_err(TableError::MalformedElf)?;
    match file.architecture() {
        Architecture::X86_64 => Ok(file),
        other => Err(TableError::NotX86_64(other)),
    }
}

fn elf32_architecture<'data, R: ReadRef<'data>>(elf: R) -> Architecture {
    object::read::elf::ElfFile32::<'data, Endianness, R>::parse(elf)
        .map(|file| file.architecture())
        .unwrap_or(Architecture::Unknown)
}

/// An ELF file's CFI sections, and the base addresses their pointers may be relative to.
pub(crate) struct CfiSections<'data> {
    /// `.eh_frame`, if present and not empty.
    pub eh_frame: Option<&'data [u8]>,
    /// `.debug_frame`, if present and not empty (decompressed if it can be; a compressed one
    /// this build of `object` cannot inflate is left out).
    pub debug_frame: Option<Cow<'data, [u8]>>,
    /// Addresses of `.eh_frame`, `.eh_frame_hdr`, `.text` and `.got`.
    pub bases: gimli::BaseAddresses,
}

/// Finds the CFI sections of a parsed file.
pub(crate) fn cfi_sections<'data, R: ReadRef<'data>>(
    file: &ElfFile64<'data, Endianness, R>,
) -> Result<CfiSections<'data>, TableError> {
    let address = |name: &str| file.section_by_name(name).map(|s| s.address());
    let mut bases = gimli::BaseAddresses::default();
    if let Some(addr) = address(".eh_frame") {
        bases = bases.set_eh_frame(addr);
    }
    if let Some(addr) = address(".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(addr);
    }
    if let Some(addr) = address(".text") {
        bases = bases.set_text(addr);
    }
    if let Some(addr) = address(".got") {
        bases = bases.set_got(addr);
    }
    let eh_frame = match file.section_by_name(".eh_frame") {
        Some(section) => Some(section.data().map_err(TableError::MalformedElf)?),
        None => None,
    };
    let debug_frame = file
        .section_by_name(".debug_frame")
        .and_then(|section| section.uncompressed_data().ok());
    Ok(CfiSections {
        eh_frame: eh_frame.filter(|data| !data.is_empty()),
        debug_frame: debug_frame.filter(|data| !data.is_empty()),
        bases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(file_offset: u64, vaddr: u64, file_size: u64, executable: bool) -> LoadSegment {
        LoadSegment {
            file_offset,
            vaddr,
            file_size,
            executable,
        }
    }

    #[test]
    fn bias_of_shared_pages() {
        // ld -z separate-code: R, RX, R, and RW sharing the last R's page.
        let facts = ElfFacts {
            build_id: None,
            cfi_bytes: 0,
            segments: vec![
                segment(0, 0, 0x688, false),
                segment(0x1000, 0x1000, 0x389, true),
                segment(0x2000, 0x2000, 0x208, false),
                segment(0x2dd0, 0x3dd0, 0x258, false),
            ],
        };
        let base = 0x5555_5555_4000;
        assert_eq!(facts.bias(base, 0), Some(base));
        assert_eq!(facts.bias(base + 0x1000, 0x1000), Some(base));
        assert_eq!(facts.bias(base + 0x2000, 0x2000), Some(base));
        assert_eq!(facts.bias(base + 0x5000, 0x5000), None);

        // lld-style packing: RX starts inside the R segment's page, one page higher in memory.
        let facts = ElfFacts {
            build_id: None,
            cfi_bytes: 0,
            segments: vec![
                segment(0, 0, 0x5a0, false),
                segment(0x5a0, 0x15a0, 0x300, true),
            ],
        };
        // The r-xp mapping at file offset 0 is the executable segment's.
        assert_eq!(facts.bias(base + 0x1000, 0), Some(base));
    }
}
