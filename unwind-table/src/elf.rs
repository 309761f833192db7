//! What the crate reads from ELF headers: the file's kind, its CFI sections, its GNU build id,
//! its `PT_LOAD` segments and which symbol sections it has. Only the headers and the sections
//! asked for are read (a file read through [`object::ReadCache`] costs what it reads: its
//! symbol tables, tens of MB in a large binary, are never read here).

use object::elf::{FileHeader64, SectionHeader64, ELF_NOTE_GNU, NT_GNU_BUILD_ID, PT_LOAD};
use object::read::elf::{FileHeader, NoteIterator, ProgramHeader, SectionHeader, SectionTable};
use object::{Architecture, Endianness, FileKind, ReadRef};

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
    /// Whether it has a `.symtab` with a symbol in it (a stripped file has none).
    pub has_symbol_table: bool,
    /// Whether it has DWARF (`.debug_info`).
    pub has_dwarf: bool,
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
    ///     segments: vec![LoadSegment {
    ///         file_offset: 0x1000,
    ///         vaddr: 0x401000,
    ///         file_size: 0x2000,
    ///         executable: true,
    ///     }],
    ///     ..ElfFacts::default()
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

/// Reads the GNU build id, the `PT_LOAD` segments and the symbol sections of an x86-64 ELF
/// file.
///
/// # Errors
///
/// [`TableError`] when the bytes are not a readable x86-64 ELF file.
pub fn elf_facts<'data, R: ReadRef<'data>>(elf: R) -> Result<ElfFacts, TableError> {
    let file = Elf::parse(elf)?;
    let segments = file
        .header
        .program_headers(file.endian, elf)
        .map_err(TableError::MalformedElf)?
        .iter()
        .filter(|segment| segment.p_type(file.endian) == PT_LOAD)
        .map(|segment| LoadSegment {
            file_offset: segment.p_offset(file.endian),
            vaddr: segment.p_vaddr(file.endian),
            file_size: segment.p_filesz(file.endian),
            executable: segment.p_flags(file.endian) & object::elf::PF_X != 0,
        })
        .collect();
    let size = |name: &[u8]| file.section(name).map_or(0, |s| s.sh_size(file.endian));
    Ok(ElfFacts {
        build_id: file.build_id()?,
        segments,
        cfi_bytes: size(b".eh_frame") + size(b".debug_frame"),
        has_symbol_table: size(b".symtab") > 24,
        has_dwarf: file.section(b".debug_info").is_some(),
    })
}

/// A parsed x86-64 ELF header and section table, over the file's bytes.
pub(crate) struct Elf<'data, R: ReadRef<'data>> {
    data: R,
    header: &'data FileHeader64<Endianness>,
    endian: Endianness,
    sections: SectionTable<'data, FileHeader64<Endianness>, R>,
}

impl<'data, R: ReadRef<'data>> Elf<'data, R> {
    /// Parses the header and the section table of a 64-bit x86-64 ELF file.
    pub(crate) fn parse(data: R) -> Result<Self, TableError> {
        match FileKind::parse(data) {
            Ok(FileKind::Elf64) => {}
            Ok(FileKind::Elf32) => return Err(TableError::NotX86_64(elf32_architecture(data))),
            Ok(other) => return Err(TableError::NotElf(format!("a {other:?} file"))),
            Err(err) => return Err(TableError::NotElf(err.to_string())),
        }
        let header = FileHeader64::<Endianness>::parse(data).map_err(TableError::MalformedElf)?;
        let endian = header.endian().map_err(TableError::MalformedElf)?;
        if header.e_machine(endian) != object::elf::EM_X86_64 {
            return Err(TableError::NotX86_64(machine_architecture(
                header.e_machine(endian),
            )));
        }
        let sections = header
            .sections(endian, data)
            .map_err(TableError::MalformedElf)?;
        Ok(Self {
            data,
            header,
            endian,
            sections,
        })
    }

    /// The header of the section called `name`.
    fn section(&self, name: &[u8]) -> Option<&'data SectionHeader64<Endianness>> {
        self.sections
            .section_by_name(self.endian, name)
            .map(|(_, section)| section)
    }

    /// The address of the section called `name`.
    fn address(&self, name: &[u8]) -> Option<u64> {
        self.section(name).map(|s| s.sh_addr(self.endian))
    }

    /// The contents of the section called `name`, unless it is empty, compressed (this build
    /// of `object` cannot inflate it) or without bytes in the file.
    fn data(&self, name: &[u8]) -> Result<Option<&'data [u8]>, TableError> {
        let Some(section) = self.section(name) else {
            return Ok(None);
        };
        if section.sh_flags(self.endian) & u64::from(object::elf::SHF_COMPRESSED) != 0 {
            return Ok(None);
        }
        let data = section
            .data(self.endian, self.data)
            .map_err(TableError::MalformedElf)?;
        Ok(Some(data).filter(|data| !data.is_empty()))
    }

    /// The GNU build id note's bytes, from the note sections (else the note segments).
    fn build_id(&self) -> Result<Option<Vec<u8>>, TableError> {
        let endian = self.endian;
        let malformed = TableError::MalformedElf;
        if !self.sections.is_empty() {
            for section in self.sections.iter() {
                let notes = section.notes(endian, self.data).map_err(malformed)?;
                if let Some(id) = gnu_build_id(notes, endian)? {
                    return Ok(Some(id));
                }
            }
            return Ok(None);
        }
        let segments = self
            .header
            .program_headers(endian, self.data)
            .map_err(malformed)?;
        for segment in segments {
            let notes = segment.notes(endian, self.data).map_err(malformed)?;
            if let Some(id) = gnu_build_id(notes, endian)? {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }
}

/// The GNU build id among `notes`.
fn gnu_build_id(
    notes: Option<NoteIterator<'_, FileHeader64<Endianness>>>,
    endian: Endianness,
) -> Result<Option<Vec<u8>>, TableError> {
    let Some(mut notes) = notes else {
        return Ok(None);
    };
    while let Some(note) = notes.next().map_err(TableError::MalformedElf)? {
        if note.name() == ELF_NOTE_GNU && note.n_type(endian) == NT_GNU_BUILD_ID {
            return Ok(Some(note.desc().to_vec()));
        }
    }
    Ok(None)
}

fn elf32_architecture<'data, R: ReadRef<'data>>(elf: R) -> Architecture {
    object::read::elf::ElfFile32::<'data, Endianness, R>::parse(elf)
        .map(|file| object::Object::architecture(&file))
        .unwrap_or(Architecture::Unknown)
}

fn machine_architecture(machine: u16) -> Architecture {
    match machine {
        object::elf::EM_AARCH64 => Architecture::Aarch64,
        object::elf::EM_386 => Architecture::I386,
        object::elf::EM_ARM => Architecture::Arm,
        object::elf::EM_RISCV => Architecture::Riscv64,
        object::elf::EM_PPC64 => Architecture::PowerPc64,
        object::elf::EM_S390 => Architecture::S390x,
        _ => Architecture::Unknown,
    }
}

/// An ELF file's CFI sections, and the base addresses their pointers may be relative to.
pub(crate) struct CfiSections<'data> {
    /// `.eh_frame`, if present and not empty.
    pub eh_frame: Option<&'data [u8]>,
    /// `.debug_frame`, if present, not empty and not compressed.
    pub debug_frame: Option<&'data [u8]>,
    /// Addresses of `.eh_frame`, `.eh_frame_hdr`, `.text` and `.got`.
    pub bases: gimli::BaseAddresses,
}

/// Finds the CFI sections of a parsed file.
pub(crate) fn cfi_sections<'data, R: ReadRef<'data>>(
    file: &Elf<'data, R>,
) -> Result<CfiSections<'data>, TableError> {
    let mut bases = gimli::BaseAddresses::default();
    if let Some(addr) = file.address(b".eh_frame") {
        bases = bases.set_eh_frame(addr);
    }
    if let Some(addr) = file.address(b".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(addr);
    }
    if let Some(addr) = file.address(b".text") {
        bases = bases.set_text(addr);
    }
    if let Some(addr) = file.address(b".got") {
        bases = bases.set_got(addr);
    }
    Ok(CfiSections {
        eh_frame: file.data(b".eh_frame")?,
        debug_frame: file.data(b".debug_frame")?,
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
            segments: vec![
                segment(0, 0, 0x688, false),
                segment(0x1000, 0x1000, 0x389, true),
                segment(0x2000, 0x2000, 0x208, false),
                segment(0x2dd0, 0x3dd0, 0x258, false),
            ],
            ..ElfFacts::default()
        };
        let base = 0x5555_5555_4000;
        assert_eq!(facts.bias(base, 0), Some(base));
        assert_eq!(facts.bias(base + 0x1000, 0x1000), Some(base));
        assert_eq!(facts.bias(base + 0x2000, 0x2000), Some(base));
        assert_eq!(facts.bias(base + 0x5000, 0x5000), None);

        // lld-style packing: RX starts inside the R segment's page, one page higher in memory.
        let facts = ElfFacts {
            segments: vec![
                segment(0, 0, 0x5a0, false),
                segment(0x5a0, 0x15a0, 0x300, true),
            ],
            ..ElfFacts::default()
        };
        // The r-xp mapping at file offset 0 is the executable segment's.
        assert_eq!(facts.bias(base + 0x1000, 0), Some(base));
    }
}
