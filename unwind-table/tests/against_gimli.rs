//! Tables built from real binaries (Debian's libc, and C and Rust fixtures compiled here)
//! checked against gimli's own answers, row by row, plus the rows the probe relies on.

mod common;

use std::ops::Range;
use std::path::Path;

use common::{fixtures, read, symbol, LIBC};
use gimli::{
    BaseAddresses, CfaRule, DebugFrame, EhFrame, EhFrameHdr, EndianSlice, FrameDescriptionEntry,
    LittleEndian, Operation, Register, RegisterRule, UnwindContext, UnwindExpression,
    UnwindSection, UnwindTableRow,
};
use object::{Object, ObjectSection};
use unwind_table::{build, cfa, lookup, rbp, TableError, UnwindRow, UnwindTable};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// A row's rules, without its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rules {
    cfa: u8,
    cfa_offset: i16,
    rbp: u8,
    rbp_offset: i8,
}

impl Rules {
    const fn new(cfa: u8, cfa_offset: i16, rbp: u8, rbp_offset: i8) -> Self {
        Self {
            cfa,
            cfa_offset,
            rbp,
            rbp_offset,
        }
    }

    const NONE: Self = Self::new(cfa::NONE, 0, rbp::SAME, 0);

    fn of(row: &UnwindRow) -> Self {
        Self::new(
            row.cfa_kind(),
            row.cfa_offset,
            row.rbp_kind(),
            row.rbp_offset,
        )
    }
}

/// The operations of a CFI expression, parsed by gimli.
fn operations<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    expression: &UnwindExpression<usize>,
) -> Vec<Operation<Slice<'a>>> {
    let encoding = gimli::Encoding {
        address_size: 8,
        format: gimli::Format::Dwarf32,
        version: 4,
    };
    let expression = expression.get(section).expect("expression");
    expression
        .operations(encoding)
        .collect::<Result<_, _>>()
        .expect("operations")
}

/// What the probe's rules should be for gimli's row, written from the brief, independently of
/// the crate's translator.
fn expected<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    row: &UnwindTableRow<usize>,
    signal_frame: bool,
) -> Rules {
    use Operation::*;
    match row.register(Register(16)) {
        Some(RegisterRule::Undefined) => return Rules::new(cfa::END, 0, rbp::SAME, 0),
        _ if signal_frame => return Rules::new(cfa::SIGNAL, 0, rbp::SAME, 0),
        Some(RegisterRule::Offset(-8)) => {}
        _ => return Rules::NONE,
    }
    let saved_rbp = row.register(Register(6));
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset {
            register: Register(7),
            offset,
        } => (cfa::RSP, *offset),
        CfaRule::RegisterAndOffset {
            register: Register(6),
            offset,
        } => (cfa::RBP, *offset),
        CfaRule::RegisterAndOffset { .. } => return Rules::NONE,
        CfaRule::Expression(expression) => match operations(section, expression).as_slice() {
            [RegisterOffset {
                register: Register(7),
                offset,
                ..
            }, RegisterOffset {
                register: Register(16),
                offset: 0,
                ..
            }, UnsignedConstant { value: 15 }, And, UnsignedConstant { value: threshold }, Ge, UnsignedConstant { value: 3 }, Shl, Plus] =>
            {
                return match (i16::try_from(*offset), saved_rbp) {
                    (Ok(offset), None | Some(RegisterRule::SameValue)) => {
                        Rules::new(cfa::PLT, offset, rbp::SAME, *threshold as i8)
                    }
                    _ => Rules::NONE,
                };
            }
            [RegisterOffset {
                register: Register(6),
                offset,
                ..
            }, Deref { .. }] => (cfa::DEREF_RBP, *offset),
            _ => return Rules::NONE,
        },
    };
    let (kind, offset) = if let Ok(offset) = i16::try_from(offset) {
        (kind, offset)
    } else if kind == cfa::RSP && offset % 8 == 0 && i16::try_from(offset / 8).is_ok() {
        (cfa::RSP_SCALED, (offset / 8) as i16)
    } else {
        return Rules::NONE;
    };
    let slot = |n: i64| (n % 8 == 0 && (-1024..=1016).contains(&n)).then_some((n / 8) as i8);
    let (rbp_kind, rbp_offset) = match saved_rbp {
        None | Some(RegisterRule::SameValue) => (rbp::SAME, 0),
        Some(RegisterRule::Offset(n)) => match slot(n) {
            Some(slot) => (rbp::AT_CFA, slot),
            None => (rbp::UNDEFINED, 0),
        },
        Some(RegisterRule::Expression(expression)) => {
            match operations(section, &expression).as_slice() {
                [RegisterOffset {
                    register: Register(6),
                    offset,
                    ..
                }] => match slot(*offset) {
                    Some(slot) => (rbp::AT_RBP, slot),
                    None => (rbp::UNDEFINED, 0),
                },
                _ => (rbp::UNDEFINED, 0),
            }
        }
        Some(_) => (rbp::UNDEFINED, 0),
    };
    Rules::new(kind, offset, rbp_kind, rbp_offset)
}

/// Every FDE of a section, in section order.
fn fdes<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &BaseAddresses,
) -> Vec<FrameDescriptionEntry<Slice<'a>>> {
    let mut fdes = Vec::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next().expect("entry") {
        if let gimli::CieOrFde::Fde(partial) = entry {
            fdes.push(partial.parse(S::cie_from_offset).expect("FDE"));
        }
    }
    fdes
}

/// The address ranges of gimli's rows of an FDE.
fn row_ranges<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    fde: &FrameDescriptionEntry<Slice<'a>>,
) -> Vec<Range<u64>> {
    let mut ctx = UnwindContext::new();
    let mut table = fde.rows(section, bases, &mut ctx).expect("rows");
    let mut ranges = Vec::new();
    while let Some(row) = table.next_row().expect("row") {
        ranges.push(row.start_address()..row.end_address());
    }
    ranges
}

fn range_of(fde: &FrameDescriptionEntry<Slice<'_>>) -> Range<u64> {
    fde.initial_address()..fde.end_address()
}

/// What a check found, for the file-specific assertions.
struct Checked {
    elf: Vec<u8>,
    table: UnwindTable,
    /// Every FDE's range, `.eh_frame`'s then `.debug_frame`'s.
    eh_frame_fdes: Vec<Range<u64>>,
    debug_frame_fdes: Vec<Range<u64>>,
}

/// Builds the table of `path` and checks, for every gimli row of every FDE, that `lookup` at
/// the row's first and last address gives the translation of gimli's own answer there, and
/// that the gaps between FDEs give NONE rows.
fn check_against_gimli(path: &Path) -> Checked {
    let elf = read(path);
    let table = build(&elf[..]).expect("build");
    let rows = &table.rows;
    assert_eq!(table.stats.rows, rows.len());
    assert!(!rows.is_empty());
    for pair in rows.windows(2) {
        assert!(pair[0].pc < pair[1].pc, "unsorted: {pair:x?}");
        assert_ne!(
            Rules::of(&pair[0]),
            Rules::of(&pair[1]),
            "not collapsed: {pair:x?}"
        );
    }
    assert_eq!(table.stats.skipped_fdes, 0);

    let file = object::File::parse(&*elf).expect("ELF");
    let address = |name| file.section_by_name(name).map_or(0, |s| s.address());
    let data = |name| {
        file.section_by_name(name)
            .map(|s| s.data().expect("section data"))
    };
    let bases = BaseAddresses::default()
        .set_eh_frame(address(".eh_frame"))
        .set_eh_frame_hdr(address(".eh_frame_hdr"))
        .set_text(address(".text"))
        .set_got(address(".got"));
    let mut eh_frame = EhFrame::new(data(".eh_frame").expect(".eh_frame"), LittleEndian);
    eh_frame.set_address_size(8);
    // gimli's answer for an address: the binary search of `.eh_frame_hdr` (a linear
    // `EhFrame::unwind_info_for_address` per address is too slow for libc in a debug build).
    let hdr = EhFrameHdr::new(data(".eh_frame_hdr").expect(".eh_frame_hdr"), LittleEndian)
        .parse(&bases, 8)
        .expect("eh_frame_hdr");
    let hdr_table = hdr.table().expect("eh_frame_hdr table");
    let debug_frame = data(".debug_frame").map(|data| {
        let mut section = DebugFrame::new(data, LittleEndian);
        section.set_address_size(8);
        section
    });
    let no_bases = BaseAddresses::default();

    let eh_fdes = fdes(&eh_frame, &bases);
    let debug_fdes = debug_frame
        .as_ref()
        .map(|section| fdes(section, &no_bases))
        .unwrap_or_default();

    // FDEs that overlap another are not compared (the first seen wins in the table; the
    // header's search may pick either). None of these files has any.
    let mut sorted: Vec<Range<u64>> = eh_fdes.iter().map(range_of).collect();
    sorted.sort_by_key(|range| range.start);
    let overlapping: Vec<Range<u64>> = sorted
        .windows(2)
        .filter(|pair| pair[1].start < pair[0].end)
        .flat_map(|pair| [pair[0].clone(), pair[1].clone()])
        .collect();
    eprintln!(
        "{}: {} .eh_frame FDEs ({} overlapping), {} .debug_frame FDEs",
        path.display(),
        eh_fdes.len(),
        overlapping.len(),
        debug_fdes.len()
    );
    let in_eh_frame = |addr: u64| sorted.iter().any(|range| range.contains(&addr));

    let mut ctx = UnwindContext::new();
    let mut checks = 0usize;
    let mut check = |addr: u64, want: Rules, what: &str| {
        let got = lookup(rows, addr).unwrap_or_else(|| panic!("no row at {addr:#x} ({what})"));
        assert_eq!(
            Rules::of(got),
            want,
            "at {addr:#x} ({what}): row {got:x?}, gimli says {want:?}"
        );
        checks += 1;
    };
    for fde in &eh_fdes {
        if overlapping.contains(&range_of(fde)) {
            continue;
        }
        for range in row_ranges(&eh_frame, &bases, fde) {
            if range.is_empty() {
                continue;
            }
            for addr in [range.start, range.end - 1] {
                let found = hdr_table
                    .fde_for_address(&eh_frame, &bases, addr, EhFrame::cie_from_offset)
                    .expect("an FDE");
                let row = found
                    .unwind_info_for_address(&eh_frame, &bases, &mut ctx, addr)
                    .expect("gimli's row");
                let want = expected(&eh_frame, row, found.is_signal_trampoline());
                check(addr, want, ".eh_frame");
            }
        }
    }
    if let Some(section) = &debug_frame {
        for fde in &debug_fdes {
            for range in row_ranges(section, &no_bases, fde) {
                if range.is_empty() {
                    continue;
                }
                for addr in [range.start, range.end - 1] {
                    if in_eh_frame(addr) {
                        continue;
                    }
                    let found = section
                        .fde_for_address(&no_bases, addr, DebugFrame::cie_from_offset)
                        .expect("an FDE");
                    let row = section
                        .unwind_info_for_address(
                            &no_bases,
                            &mut ctx,
                            addr,
                            DebugFrame::cie_from_offset,
                        )
                        .expect("gimli's row");
                    let want = expected(section, row, found.is_signal_trampoline());
                    check(addr, want, ".debug_frame");
                }
            }
        }
    }

    // Gaps between FDEs (of either section) have NONE rows, and so does the end.
    let mut all: Vec<Range<u64>> = eh_fdes.iter().chain(&debug_fdes).map(range_of).collect();
    all.retain(|range| !range.is_empty());
    all.sort_by_key(|range| range.start);
    let mut end = all[0].start;
    let mut gaps = 0;
    for range in &all {
        if range.start > end {
            check(end, Rules::NONE, "gap after an FDE");
            gaps += 1;
        }
        end = end.max(range.end);
    }
    check(end, Rules::NONE, "after the last FDE");
    if all[0].start > 0 {
        assert_eq!(lookup(rows, all[0].start - 1), None);
    }
    eprintln!(
        "{}: {} rows, {} bytes, {:?}; {checks} lookups checked, {gaps} gaps",
        path.display(),
        rows.len(),
        rows.len() * size_of::<UnwindRow>(),
        table.stats
    );
    assert!(gaps > 0);
    let eh_frame_fdes = eh_fdes.iter().map(range_of).collect();
    let debug_frame_fdes = debug_fdes.iter().map(range_of).collect();
    drop((eh_fdes, debug_fdes));
    Checked {
        elf,
        table,
        eh_frame_fdes,
        debug_frame_fdes,
    }
}

/// The row for the first address of a symbol of the file.
fn at_symbol<'t>(checked: &'t Checked, name: &str) -> (Range<u64>, &'t UnwindRow) {
    let range = symbol(&checked.elf, name).unwrap_or_else(|| panic!("no symbol {name}"));
    let row = lookup(&checked.table.rows, range.start).expect("a row");
    (range, row)
}

/// The rows whose pc lies in `range`, and the row holding at its start.
fn rows_in<'t>(checked: &'t Checked, range: &Range<u64>) -> Vec<&'t UnwindRow> {
    let rows = &checked.table.rows;
    let mut found: Vec<&UnwindRow> = lookup(rows, range.start).into_iter().collect();
    found.extend(
        rows.iter()
            .filter(|row| range.start < u64::from(row.pc) && u64::from(row.pc) < range.end),
    );
    found
}

fn has(checked: &Checked, range: &Range<u64>, rules: Rules) -> bool {
    rows_in(checked, range)
        .iter()
        .any(|row| Rules::of(row) == rules)
}

fn count_kind(table: &UnwindTable, kind: u8) -> usize {
    table
        .rows
        .iter()
        .filter(|row| row.cfa_kind() == kind)
        .count()
}

/// What the C fixture's functions must come out as (PIE, non-PIE, or CFI in `.debug_frame`).
fn check_c_fixture(checked: &Checked) {
    // Leaf-ish functions with no frame: CFA = rsp + 8 on entry.
    for name in ["spin", "mid", "outer", "cmp_long"] {
        let (_, row) = at_symbol(checked, name);
        assert_eq!(
            Rules::of(row),
            Rules::new(cfa::RSP, 8, rbp::SAME, 0),
            "{name}"
        );
    }
    // 100,000 bytes of locals: the CFA offset does not fit an i16, its eighth does.
    let (range, _) = at_symbol(checked, "big_frame");
    assert!(
        has(
            checked,
            &range,
            Rules::new(cfa::RSP_SCALED, 12_501, rbp::SAME, 0)
        ) || (0..8).any(|extra| has(
            checked,
            &range,
            Rules::new(cfa::RSP_SCALED, 12_501 + extra, rbp::SAME, 0)
        )),
        "big_frame has no scaled row"
    );
    assert!(has(checked, &range, Rules::new(cfa::RSP, 8, rbp::SAME, 0)));
    // Realigned through rbp: CFA = rbp + 16, rbp saved at CFA − 16.
    let (range, _) = at_symbol(checked, "realigned");
    assert!(has(
        checked,
        &range,
        Rules::new(cfa::RBP, 16, rbp::AT_CFA, -2)
    ));
    // Realigned through a DRAP register: CFA = r10 in the prologue (unsupported), then
    // CFA = *(rbp − 8 or so, where r10 was pushed) with rbp saved at rbp + 0.
    let (range, _) = at_symbol(checked, "drap");
    assert!(
        rows_in(checked, &range)
            .iter()
            .any(|row| row.cfa_kind() == cfa::DEREF_RBP
                && row.cfa_offset < 0
                && row.rbp_kind() == rbp::AT_RBP
                && row.rbp_offset == 0),
        "drap: {:x?}",
        rows_in(checked, &range)
    );
    assert!(has(checked, &range, Rules::NONE), "drap has no NONE row");
    assert!(
        checked.table.stats.unsupported_rows >= 3,
        "{:?}",
        checked.table.stats
    );
    // The PLT (its CFI is in .eh_frame in every variant).
    assert!(count_kind(&checked.table, cfa::PLT) > 0);
    assert!(checked.table.rows.iter().any(|row| Rules::of(row)
        == Rules::new(cfa::PLT, 8, rbp::SAME, 11)
        || Rules::of(row) == Rules::new(cfa::PLT, 8, rbp::SAME, 10)));
    // _start's return address is undefined.
    let (range, _) = at_symbol(checked, "_start");
    assert!(has(checked, &range, Rules::new(cfa::END, 0, rbp::SAME, 0)));
}

#[test]
fn c_fixture_matches_gimli() {
    let checked = check_against_gimli(&fixtures().c_pie);
    assert!(checked.debug_frame_fdes.is_empty());
    check_c_fixture(&checked);
}

#[test]
fn c_fixture_without_pie_matches_gimli() {
    let checked = check_against_gimli(&fixtures().c_no_pie);
    check_c_fixture(&checked);
}

#[test]
fn debug_frame_fills_what_eh_frame_does_not_cover() {
    let checked = check_against_gimli(&fixtures().c_debug_frame);
    assert!(!checked.debug_frame_fdes.is_empty());
    // The fixture's own functions are only in .debug_frame; the C runtime's in .eh_frame.
    let (spin, _) = at_symbol(&checked, "spin");
    assert!(checked
        .debug_frame_fdes
        .iter()
        .any(|r| r.contains(&spin.start)));
    assert!(!checked
        .eh_frame_fdes
        .iter()
        .any(|r| r.contains(&spin.start)));
    let stats = checked.table.stats;
    assert!(stats.fdes > checked.eh_frame_fdes.len(), "{stats:?}");
    check_c_fixture(&checked);
}

#[test]
fn rust_fixture_matches_gimli() {
    let checked = check_against_gimli(&fixtures().rust);
    for name in ["*chain_leaf", "*chain_middle", "*chain_top"] {
        let (range, row) = at_symbol(&checked, name);
        assert_eq!(
            Rules::of(row),
            Rules::new(cfa::RSP, 8, rbp::SAME, 0),
            "{name}"
        );
        assert!(
            rows_in(&checked, &range)
                .iter()
                .all(|row| matches!(row.cfa_kind(), cfa::RSP | cfa::NONE)),
            "{name}"
        );
    }
}

#[test]
fn libc_matches_gimli() {
    let checked = check_against_gimli(Path::new(LIBC));
    let table = &checked.table;
    let bytes = table.rows.len() * size_of::<UnwindRow>();
    for kind in [
        cfa::RSP,
        cfa::RBP,
        cfa::PLT,
        cfa::DEREF_RBP,
        cfa::END,
        cfa::SIGNAL,
        cfa::NONE,
    ] {
        eprintln!("libc: cfa kind {kind}: {} rows", count_kind(table, kind));
    }
    eprintln!(
        "libc: {} rows, {bytes} bytes ({:.1} KiB), {} unsupported",
        table.rows.len(),
        bytes as f64 / 1024.0,
        table.stats.unsupported_rows
    );
    assert!(bytes < 400 * 1024);

    // The thread-start code in __clone (after the syscall) has an undefined return address.
    let (clone, _) = at_symbol(&checked, "__clone");
    assert!(has(&checked, &clone, Rules::new(cfa::END, 0, rbp::SAME, 0)));
    // __restore_rt (stripped from Debian's libc) is `mov $15, %rax; syscall`.
    let restore_rt = find_restore_rt(&checked.elf);
    let row = lookup(&table.rows, restore_rt).expect("a row at __restore_rt");
    assert_eq!(Rules::of(row), Rules::new(cfa::SIGNAL, 0, rbp::SAME, 0));
    // Its FDE starts one byte early (unwinders look up return address − 1).
    let row = lookup(&table.rows, restore_rt - 1).expect("a row before __restore_rt");
    assert_eq!(row.cfa_kind(), cfa::SIGNAL);
    // The PLT.
    let plt = object::File::parse(&*checked.elf)
        .expect("ELF")
        .section_by_name(".plt")
        .map(|s| s.address()..s.address() + s.size())
        .expect(".plt");
    assert!(has(&checked, &plt, Rules::new(cfa::PLT, 8, rbp::SAME, 11)));
}

/// The address of the signal return trampoline: `mov $15, %rax; syscall` in executable
/// code.
fn find_restore_rt(elf: &[u8]) -> u64 {
    const CODE: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
    let file = object::File::parse(elf).expect("ELF");
    let text = file.section_by_name(".text").expect(".text");
    let data = text.data().expect("text");
    let at = data
        .windows(CODE.len())
        .position(|window| window == CODE)
        .expect("rt_sigreturn code");
    text.address() + at as u64
}

#[test]
fn no_cfi_is_an_empty_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stripped = dir.path().join("no-cfi");
    let status = std::process::Command::new("objcopy")
        .args([
            "--remove-section=.eh_frame",
            "--remove-section=.eh_frame_hdr",
        ])
        .arg(&fixtures().c_pie)
        .arg(&stripped)
        .status()
        .expect("objcopy");
    assert!(status.success());
    let table = build(&read(&stripped)[..]).expect("build");
    assert!(table.rows.is_empty());
    assert_eq!(table.stats, Default::default());
}

#[test]
fn errors_say_what_is_wrong() {
    assert!(matches!(
        build(&b"not an ELF file"[..]),
        Err(TableError::NotElf(_))
    ));

    // The C fixture, claiming to be AArch64 (e_machine at offset 18).
    let mut elf = read(&fixtures().c_pie);
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    let err = build(&elf[..]).expect_err("not x86-64");
    assert!(
        matches!(err, TableError::NotX86_64(object::Architecture::Aarch64)),
        "{err}"
    );
    assert!(unwind_table::elf_facts(&elf[..]).is_err());

    // The C fixture with its first CIE's version byte spoiled.
    let mut elf = read(&fixtures().c_pie);
    let file = object::File::parse(&*elf).expect("ELF");
    let (offset, _) = file
        .section_by_name(".eh_frame")
        .and_then(|s| s.file_range())
        .expect(".eh_frame");
    drop(file);
    elf[offset as usize + 8] = 9;
    let err = build(&elf[..]).expect_err("malformed CFI");
    let message = err.to_string();
    assert!(
        matches!(
            err,
            TableError::MalformedCfi {
                section: ".eh_frame",
                ..
            }
        ),
        "{message}"
    );
    eprintln!("{message}");
}
