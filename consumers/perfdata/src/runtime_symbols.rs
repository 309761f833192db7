//! Names for the frames no file on disk describes: interpreted functions (Python) and code a
//! JIT compiled at run time (V8, HotSpot).
//!
//! perf resolves a user address through the mapping (MMAP2 record) that contains it and the
//! symbol table of that mapping's file. An interpreted frame's address is its code object on the
//! heap and a JIT frame's lies in anonymous memory: perf shows both as `[unknown]`. perf's own
//! JIT support does not help a perf.data written after the fact: for any mapping named
//! `/tmp/perf-*` it reads `/tmp/perf-<pid>.map` of the process itself (perf 6.1 replaces the
//! name through the thread's namespace info; newer perf accepts only that exact name), the file
//! the runtime writes and rewrites, so ours could only clobber it.
//!
//! So each perf.data gets a companion ELF file instead, `<perf.data base>.runtime.elf`: one
//! `.symtab` function symbol per distinct runtime frame (kind, runtime, function, file, line),
//! each in its own 16-byte slot of a synthetic executable region. Every process with such frames
//! gets an MMAP2 of that region (same addresses in every process, [`REGION_START`], far above
//! any address a real process can map: no 64-bit architecture has more than 57 bits of user
//! space), with the file's path and build id, and its callchains carry the slot addresses in
//! place of the runtime frames. `perf script` and `perf report` then print
//! `leaf (/srv/app/chain.py:10)` for a Python frame and `JS:*hotLoop` for a JIT frame, with the
//! companion file as their DSO.
//!
//! A perf.data copied to another host: native frames still resolve there as before (by build
//! id, or by path when the same binaries are installed). The runtime frames resolve when the
//! companion file comes along, either at the same absolute path (the MMAP2 records name it) or
//! added to that host's build-id cache (`perf buildid-cache --add perf-….runtime.elf`; its build
//! id is in the perf.data's build-id table); without it they show as `[unknown]` in
//! `perf-….runtime.elf`. No file in /tmp is read or written.
//!
//! Bounds: at most [`MAX_SYMBOLS`] symbols per file (each costs about 24 bytes plus its name);
//! further distinct frames all get one overflow symbol, [`OVERFLOW_NAME`]. Unnamed runtime
//! frames keep their own address (and stay `[unknown]`).

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    time::{SystemTime, UNIX_EPOCH},
};

use plugin_api::{Frame, FrameKind, ProfileBatch};

/// First address of the synthetic region every process maps the companion file at. It is a
/// user address for perf (below 2^63, perf's default start of the kernel) that no process can
/// have: 63 bits, where x86-64 (5-level paging) and arm64 stop at 57 and 52.
pub const REGION_START: u64 = 0x7fff_0000_0000_0000;
/// File and region offset of the first symbol (`.text` starts here).
pub const TEXT_OFFSET: u64 = 0x1000;
/// Bytes of address space per symbol; a frame's address is the middle of its slot, so that
/// perf's "return address minus one" still lands in the same symbol.
pub const SLOT: u64 = 16;
/// Most distinct symbols one companion file holds.
pub const MAX_SYMBOLS: usize = 1 << 16;
/// Bytes of the region each MMAP2 record maps: every slot, the overflow one included.
pub const REGION_LEN: u64 = TEXT_OFFSET + (MAX_SYMBOLS as u64 + 1) * SLOT;
/// The symbol of the frames beyond [`MAX_SYMBOLS`].
pub const OVERFLOW_NAME: &str = "[runtime frames beyond the symbol file's limit]";
/// Extension of the companion file, after the perf.data's base name.
pub const EXTENSION: &str = "runtime.elf";

/// What makes two runtime frames the same symbol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SymbolKey {
    kind: FrameKind,
    runtime: String,
    function: String,
    file: String,
    line: u32,
}

/// The symbols of one companion file, assigned as frames come.
#[derive(Debug)]
pub struct RuntimeSymbols {
    path: String,
    build_id: [u8; 20],
    slots: HashMap<SymbolKey, u32>,
    names: Vec<String>,
    overflowed: bool,
}

impl RuntimeSymbols {
    /// An empty symbol file that will live at `path` (absolute: perf opens it by that name),
    /// with a fresh random build id.
    pub fn new(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            build_id: fresh_build_id(path),
            slots: HashMap::new(),
            names: Vec::new(),
            overflowed: false,
        }
    }

    /// The file's path, as the MMAP2 records name it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The file's GNU build id.
    pub fn build_id(&self) -> &[u8; 20] {
        &self.build_id
    }

    /// Number of symbols assigned (the overflow one included once used).
    pub fn len(&self) -> usize {
        self.names.len() + usize::from(self.overflowed)
    }

    /// Whether no frame got a symbol yet (then there is no file to write).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `frame` gets a synthetic address: a named interpreted or JIT frame.
    pub fn is_runtime_frame(frame: &Frame) -> bool {
        matches!(frame.kind, FrameKind::Interpreted | FrameKind::Jit) && frame.function != 0
    }

    /// The synthetic address of `frame` of `batch`, None unless [`Self::is_runtime_frame`].
    pub fn address(&mut self, batch: &ProfileBatch, frame: &Frame) -> Option<u64> {
        Self::is_runtime_frame(frame).then(|| {
            self.address_of(
                frame.kind,
                batch.str(frame.runtime),
                batch.str(frame.function),
                batch.str(frame.file),
                frame.line,
            )
        })
    }

    /// The synthetic address of the runtime frame `function` (in `file` at `line`, both
    /// optional: "" and 0): the same for the same frame, distinct for distinct frames up to
    /// [`MAX_SYMBOLS`], the overflow slot's beyond.
    pub fn address_of(
        &mut self,
        kind: FrameKind,
        runtime: &str,
        function: &str,
        file: &str,
        line: u32,
    ) -> u64 {
        let key = SymbolKey {
            kind,
            runtime: runtime.to_owned(),
            function: function.to_owned(),
            file: file.to_owned(),
            line,
        };
        let slot = match self.slots.get(&key) {
            Some(&slot) => slot,
            None if self.names.len() < MAX_SYMBOLS => {
                let slot = self.names.len() as u32;
                self.names.push(symbol_name(function, file, line));
                self.slots.insert(key, slot);
                slot
            }
            None => {
                self.overflowed = true;
                MAX_SYMBOLS as u32
            }
        };
        REGION_START + slot_offset(slot) + SLOT / 2
    }

    /// The symbol perf shows for `address`, as [`Self::to_elf`] writes it.
    pub fn name_at(&self, address: u64) -> Option<&str> {
        let slot = address.checked_sub(REGION_START + TEXT_OFFSET)? / SLOT;
        match slot as usize {
            s if s < self.names.len() => Some(&self.names[s]),
            s if s == MAX_SYMBOLS && self.overflowed => Some(OVERFLOW_NAME),
            _ => None,
        }
    }

    /// The companion file: a minimal ELF shared object with a NOBITS `.text` (no code, just
    /// the address range), the build-id note and one local function symbol per slot.
    pub fn to_elf(&self) -> Vec<u8> {
        let mut symbols: Vec<(u32, &str)> = self
            .names
            .iter()
            .enumerate()
            .map(|(slot, name)| (slot as u32, name.as_str()))
            .collect();
        if self.overflowed {
            symbols.push((MAX_SYMBOLS as u32, OVERFLOW_NAME));
        }
        let text_size = slot_offset(symbols.last().map_or(0, |&(slot, _)| slot + 1)) - TEXT_OFFSET;
        elf(&self.build_id, &symbols, text_size)
    }
}

/// Offset in the region (and the file's addresses) of slot `slot`.
fn slot_offset(slot: u32) -> u64 {
    TEXT_OFFSET + u64::from(slot) * SLOT
}

/// `function (file:line)`, `function (file)` or `function`; no control characters (a NUL
/// would cut the name in the string table, a newline perf's output).
fn symbol_name(function: &str, file: &str, line: u32) -> String {
    let name = match (file.is_empty(), line) {
        (true, _) => function.to_owned(),
        (false, 0) => format!("{function} ({file})"),
        (false, line) => format!("{function} ({file}:{line})"),
    };
    name.replace(|c: char| c.is_control(), " ")
}

/// 20 random bytes: unique per file, so that perf's build-id cache never confuses two files.
fn fresh_build_id(path: &str) -> [u8; 20] {
    let state = RandomState::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut id = [0u8; 20];
    for (i, chunk) in id.chunks_mut(8).enumerate() {
        let word = state.hash_one((path, now, std::process::id(), i));
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    id
}

const ET_DYN: u16 = 3;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_R: u32 = 4;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_NOTE: u32 = 7;
const SHT_NOBITS: u32 = 8;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
const STT_FUNC: u8 = 2;
const NT_GNU_BUILD_ID: u32 = 3;
const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const SHDR_SIZE: u64 = 64;
const SYM_SIZE: u64 = 24;

/// The ELF machine of this build's target (the perf.data is written on the profiled host).
fn machine() -> u16 {
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else if cfg!(target_arch = "riscv64") {
        243
    } else if cfg!(target_arch = "powerpc64") {
        21
    } else if cfg!(target_arch = "s390x") {
        22
    } else {
        0
    }
}

/// An ELF64 file in this machine's byte order: headers, build-id note, `.symtab`, `.strtab`,
/// `.shstrtab`, section headers. Addresses equal file offsets (one PT_LOAD at 0), so perf's
/// symbol adjustment is nil and a symbol's value is its offset in the mapped region.
fn elf(build_id: &[u8; 20], symbols: &[(u32, &str)], text_size: u64) -> Vec<u8> {
    let mut w = Writer::default();
    let shstrtab: &[u8] = b"\0.text\0.note.gnu.build-id\0.symtab\0.strtab\0.shstrtab\0";
    let name_at = |name: &str| {
        let needle = format!("\0{name}\0");
        shstrtab
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .map_or(0, |p| p as u32 + 1)
    };

    let note_offset = EHDR_SIZE + 2 * PHDR_SIZE;
    let mut note = Writer::default();
    note.u32(4);
    note.u32(build_id.len() as u32);
    note.u32(NT_GNU_BUILD_ID);
    note.bytes(b"GNU\0");
    note.bytes(build_id);
    let note = note.0;

    let mut strtab = vec![0u8];
    let mut symtab = Writer::default();
    symtab.bytes(&[0; SYM_SIZE as usize]);
    for &(slot, name) in symbols {
        symtab.u32(strtab.len() as u32);
        symtab.bytes(&[STT_FUNC, 0]); // local binding, default visibility
        symtab.u16(1); // .text
        symtab.u64(slot_offset(slot));
        symtab.u64(SLOT);
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
    }
    let symtab = symtab.0;
    let symtab_offset = (note_offset + note.len() as u64).next_multiple_of(8);
    let strtab_offset = symtab_offset + symtab.len() as u64;
    let shstrtab_offset = strtab_offset + strtab.len() as u64;
    let shdrs_offset = (shstrtab_offset + shstrtab.len() as u64).next_multiple_of(8);

    // ELF header.
    let data = if cfg!(target_endian = "big") { 2 } else { 1 };
    w.bytes(&[0x7f, b'E', b'L', b'F', 2, data, 1, 0]);
    w.bytes(&[0; 8]);
    w.u16(ET_DYN);
    w.u16(machine());
    w.u32(1);
    w.u64(0);
    w.u64(EHDR_SIZE);
    w.u64(shdrs_offset);
    w.u32(0);
    w.u16(EHDR_SIZE as u16);
    w.u16(PHDR_SIZE as u16);
    w.u16(2);
    w.u16(SHDR_SIZE as u16);
    w.u16(6);
    w.u16(5);

    // Program headers: the region (nothing of it in the file), the note.
    let phdr =
        |w: &mut Writer, kind: u32, flags: u32, offset: u64, size: u64, memsz: u64, align| {
            w.u32(kind);
            w.u32(flags);
            w.u64(offset);
            w.u64(offset);
            w.u64(offset);
            w.u64(size);
            w.u64(memsz);
            w.u64(align);
        };
    phdr(
        &mut w,
        PT_LOAD,
        PF_R | PF_X,
        0,
        0,
        TEXT_OFFSET + text_size,
        0x1000,
    );
    let note_len = note.len() as u64;
    phdr(&mut w, PT_NOTE, PF_R, note_offset, note_len, note_len, 4);

    w.bytes(&note);
    w.pad_to(symtab_offset);
    w.bytes(&symtab);
    w.bytes(&strtab);
    w.bytes(shstrtab);
    w.pad_to(shdrs_offset);

    // Section headers.
    #[allow(clippy::too_many_arguments)]
    fn shdr(
        w: &mut Writer,
        name: u32,
        kind: u32,
        flags: u64,
        offset: u64,
        size: u64,
        link: u32,
        info: u32,
        align: u64,
        entsize: u64,
    ) {
        w.u32(name);
        w.u32(kind);
        w.u64(flags);
        w.u64(if flags & SHF_ALLOC != 0 { offset } else { 0 });
        w.u64(offset);
        w.u64(size);
        w.u32(link);
        w.u32(info);
        w.u64(align);
        w.u64(entsize);
    }
    shdr(&mut w, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    let text_flags = SHF_ALLOC | SHF_EXECINSTR;
    let text = name_at(".text");
    shdr(
        &mut w,
        text,
        SHT_NOBITS,
        text_flags,
        TEXT_OFFSET,
        text_size,
        0,
        0,
        16,
        0,
    );
    let (name, size) = (name_at(".note.gnu.build-id"), note_len);
    shdr(
        &mut w,
        name,
        SHT_NOTE,
        SHF_ALLOC,
        note_offset,
        size,
        0,
        0,
        4,
        0,
    );
    let (name, size) = (name_at(".symtab"), symtab.len() as u64);
    let locals = symbols.len() as u32 + 1;
    shdr(
        &mut w,
        name,
        SHT_SYMTAB,
        0,
        symtab_offset,
        size,
        4,
        locals,
        8,
        SYM_SIZE,
    );
    let (name, size) = (name_at(".strtab"), strtab.len() as u64);
    shdr(&mut w, name, SHT_STRTAB, 0, strtab_offset, size, 0, 0, 1, 0);
    let (name, size) = (name_at(".shstrtab"), shstrtab.len() as u64);
    shdr(
        &mut w,
        name,
        SHT_STRTAB,
        0,
        shstrtab_offset,
        size,
        0,
        0,
        1,
        0,
    );
    w.0
}

/// Bytes in this machine's order.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_ne_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_ne_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_ne_bytes());
    }
    fn pad_to(&mut self, offset: u64) {
        self.0.resize(offset as usize, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python(symbols: &mut RuntimeSymbols, function: &str, line: u32) -> u64 {
        symbols.address_of(
            FrameKind::Interpreted,
            "cpython",
            function,
            "/app/a.py",
            line,
        )
    }

    #[test]
    fn the_same_frame_gets_the_same_address_distinct_frames_distinct_ones() {
        let mut symbols = RuntimeSymbols::new("/p/perf-x.runtime.elf");
        assert!(symbols.is_empty());
        let leaf = python(&mut symbols, "leaf", 10);
        assert_eq!(python(&mut symbols, "leaf", 10), leaf);
        let others = [
            python(&mut symbols, "leaf", 11),
            python(&mut symbols, "mid", 10),
            symbols.address_of(FrameKind::Interpreted, "cpython", "leaf", "/app/b.py", 10),
            symbols.address_of(FrameKind::Jit, "v8", "leaf", "/app/a.py", 10),
            symbols.address_of(FrameKind::Jit, "v8", "JS:*hotLoop", "", 0),
        ];
        let mut all = vec![leaf];
        all.extend(others);
        let mut distinct = all.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), all.len(), "{all:x?}");
        assert_eq!(symbols.len(), 6);
        for address in &all {
            // User space for perf, past what any real process can map (57 bits).
            assert!(*address >= 1 << 57 && *address < 1 << 63);
            assert!((REGION_START..REGION_START + REGION_LEN).contains(address));
            assert_eq!((address - REGION_START - TEXT_OFFSET) % SLOT, SLOT / 2);
        }
        assert_eq!(symbols.name_at(leaf), Some("leaf (/app/a.py:10)"));
        assert_eq!(symbols.name_at(all[5]), Some("JS:*hotLoop"));
        assert_eq!(symbols.name_at(REGION_START), None);
    }

    #[test]
    fn the_symbol_count_is_bounded_and_the_rest_share_the_overflow_symbol() {
        let mut symbols = RuntimeSymbols::new("/p/perf-x.runtime.elf");
        let addresses: Vec<u64> = (0..MAX_SYMBOLS as u32 + 10)
            .map(|line| python(&mut symbols, "f", line))
            .collect();
        assert_eq!(symbols.len(), MAX_SYMBOLS + 1);
        let overflow = addresses[MAX_SYMBOLS];
        assert!(addresses[MAX_SYMBOLS..].iter().all(|&a| a == overflow));
        assert_eq!(symbols.name_at(overflow), Some(OVERFLOW_NAME));
        assert!(overflow < REGION_START + REGION_LEN);
        // Known frames keep their slots once the table is full.
        assert_eq!(python(&mut symbols, "f", 7), addresses[7]);
        let elf = symbols.to_elf();
        assert!(elf.len() < 6 << 20, "{} bytes", elf.len());
    }

    #[test]
    fn names_carry_the_source_and_no_control_characters() {
        assert_eq!(symbol_name("f", "", 0), "f");
        assert_eq!(symbol_name("f", "a.py", 0), "f (a.py)");
        assert_eq!(symbol_name("f", "a.py", 3), "f (a.py:3)");
        assert_eq!(symbol_name("a\0b\nc", "", 0), "a b c");
    }

    #[test]
    fn the_elf_file_has_one_function_symbol_per_slot_at_its_offset() {
        let mut symbols = RuntimeSymbols::new("/p/perf-x.runtime.elf");
        let a = python(&mut symbols, "leaf", 10);
        let b = symbols.address_of(FrameKind::Jit, "v8", "JS:*hotLoop", "", 0);
        let elf = symbols.to_elf();
        let u16_at = |at: usize| u16::from_ne_bytes(elf[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_ne_bytes(elf[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_ne_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u16_at(16), ET_DYN);
        let (shoff, shnum) = (u64_at(40), u16_at(60) as usize);
        assert_eq!(shoff + shnum * SHDR_SIZE as usize, elf.len());
        let section = |i: usize| shoff + i * SHDR_SIZE as usize;
        assert_eq!(u32_at(section(1) + 4), SHT_NOBITS);
        assert_eq!(u32_at(section(3) + 4), SHT_SYMTAB);
        let (symtab, strtab) = (u64_at(section(3) + 24), u64_at(section(4) + 24));
        let symbol = |i: usize| {
            let at = symtab + i * SYM_SIZE as usize;
            let name = &elf[strtab + u32_at(at) as usize..];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap()];
            (
                String::from_utf8_lossy(name).into_owned(),
                u64_at(at + 8) as u64,
                elf[at + 4],
            )
        };
        for (i, address) in [(1, a), (2, b)] {
            let (name, value, info) = symbol(i);
            assert_eq!(info, STT_FUNC);
            assert_eq!(Some(name.as_str()), symbols.name_at(address));
            assert!((value..value + SLOT).contains(&(address - REGION_START)));
        }
        let note = u64_at(section(2) + 24);
        assert_eq!(&elf[note + 12..note + 16], b"GNU\0");
        assert_eq!(&elf[note + 16..note + 36], symbols.build_id());
        assert_ne!(
            RuntimeSymbols::new("/p/perf-x.runtime.elf").build_id(),
            symbols.build_id(),
            "fresh per file"
        );
    }
}
