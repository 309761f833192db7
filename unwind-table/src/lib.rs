//! An ELF file's call frame information (`.eh_frame`, and `.debug_frame` where present) as
//! the compact [`UnwindRow`]s the probe walks user stacks with.
//!
//! The crate is pure: it takes the bytes of an ELF file and returns rows; it opens no files.
//! The bytes come through [`object::ReadRef`]: a slice, or an [`object::ReadCache`] over a
//! reader of the caller's, which reads only the headers and sections the table needs (the
//! router reads files of other processes that way, with `pread`, never mapping them).
//!
//! - [`build`] turns the CFI into a sorted table of rows (8 bytes each, see
//!   [`probe_common::unwind`]); each row holds from its `pc` up to the next row's `pc`.
//! - [`lookup`] finds the row for an address, as the probe does.
//! - [`elf_facts`] reads the GNU build id and the `PT_LOAD` segments, and
//!   [`ElfFacts::bias`] turns a process mapping into the bias between process addresses and
//!   the file's virtual addresses (which rows hold).
//!
//! Only x86-64 is supported: the rows speak of rsp, rbp and the return address at CFA − 8.

mod cfi;
mod elf;
mod error;
mod expr;
mod rules;
mod table;

pub use elf::{elf_facts, ElfFacts, LoadSegment};
pub use error::TableError;
pub use object::ReadRef;
pub use probe_common::unwind::{cfa, rbp, UnwindRow};

/// The unwind table of one ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnwindTable {
    /// Rows sorted by `pc`, no two with the same `pc`; consecutive rows never hold the same
    /// rules. The last row is a [`cfa::NONE`] row at the end of the last FDE.
    pub rows: Vec<UnwindRow>,
    /// What the build saw.
    pub stats: BuildStats,
}

/// Counts from one [`build`].
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildStats {
    /// FDEs whose rows went into the table (a `.debug_frame` FDE whose range `.eh_frame`
    /// already covers is not counted; nor is an empty one).
    pub fdes: usize,
    /// Rows in the table (after collapsing).
    pub rows: usize,
    /// CFI rows the probe cannot follow, emitted as [`cfa::NONE`] (or with an
    /// [`rbp::UNDEFINED`] rbp): an unusual CFA register or expression, a CFA offset beyond
    /// `i16`, a return address not at CFA − 8, an rbp slot beyond `i8 × 8`. Counted before
    /// collapsing.
    pub unsupported_rows: usize,
    /// FDEs left out because an address of theirs does not fit the rows' 32-bit `pc`.
    pub skipped_fdes: usize,
}

/// Builds the unwind table of an x86-64 ELF file from its bytes.
///
/// `.eh_frame` comes first; `.debug_frame` FDEs fill only ranges no `.eh_frame` FDE covers,
/// and where FDEs overlap, the one seen first wins. Every FDE that is not followed directly by
/// another gets a [`cfa::NONE`] row at its end. A file with neither section gives an empty
/// table.
///
/// ```
/// # fn main() -> Result<(), unwind_table::TableError> {
/// # let Ok(elf) = std::fs::read("/proc/self/exe") else { return Ok(()) };
/// let table = unwind_table::build(&elf[..])?;
/// assert_eq!(table.stats.rows, table.rows.len());
/// assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// [`TableError`] when the bytes are not an ELF file, not x86-64, or hold CFI that cannot be
/// parsed.
pub fn build<'data, R: ReadRef<'data>>(elf: R) -> Result<UnwindTable, TableError> {
    let file = elf::Elf::parse(elf)?;
    let sections = elf::cfi_sections(&file)?;
    let mut builder = table::Builder::default();
    let mut stats = BuildStats::default();
    if let Some(data) = sections.eh_frame {
        cfi::add_eh_frame(data, &sections.bases, &mut builder, &mut stats)?;
    }
    if let Some(data) = sections.debug_frame {
        cfi::add_debug_frame(data, &mut builder, &mut stats)?;
    }
    let rows = builder.finish();
    stats.rows = rows.len();
    Ok(UnwindTable { rows, stats })
}

/// The row that holds for `vaddr` (a virtual address of the ELF file, see
/// [`ElfFacts::bias`]): the last row whose `pc` is at or below it, found by binary search.
/// `None` before the first row. (Every row's `pc` is a whole address: [`build`] leaves out
/// FDEs beyond 4 GiB, so an address past the table gets its closing [`cfa::NONE`] row.)
///
/// ```
/// use unwind_table::{cfa, lookup, rbp, UnwindRow};
///
/// let rows = [
///     UnwindRow::new(0x1000, cfa::RSP, 8, rbp::SAME, 0),
///     UnwindRow::new(0x1004, cfa::RSP, 16, rbp::AT_CFA, -2),
///     UnwindRow::new(0x1020, cfa::NONE, 0, rbp::SAME, 0),
/// ];
/// assert_eq!(lookup(&rows, 0xfff), None);
/// assert_eq!(lookup(&rows, 0x1003).unwrap().cfa_offset, 8);
/// assert_eq!(lookup(&rows, 0x1004).unwrap().cfa_offset, 16);
/// assert_eq!(lookup(&rows, 0x5000).unwrap().cfa_kind(), cfa::NONE);
/// ```
pub fn lookup(rows: &[UnwindRow], vaddr: u64) -> Option<&UnwindRow> {
    let after = rows.partition_point(|row| u64::from(row.pc) <= vaddr);
    after.checked_sub(1).map(|index| &rows[index])
}
