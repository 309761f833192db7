//! The unwind data the router loads into the probe's maps: compact CFI rows per executable
//! file, and each process's executable mappings pointing at them.
//!
//! A table is a sorted run of [`UnwindRow`]s in the probe's `UNWIND_ROWS` array; a row holds
//! from its `pc` up to the next row's `pc`. Addresses in rows are the ELF file's own virtual
//! addresses (`p_vaddr` space); a mapping's `bias` turns a process address into one.

/// How the canonical frame address (the caller's stack pointer) is found, low nibble of
/// [`UnwindRow::rules`].
pub mod cfa {
    /// No CFI covers this address: take one frame-pointer step instead.
    pub const NONE: u8 = 0;
    /// CFA = rsp + offset.
    pub const RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 2;
    /// The PLT rule: CFA = rsp + offset, plus 8 when `(pc & 15) >= rbp_offset` (the
    /// threshold is kept in `rbp_offset`; rbp is unchanged in a PLT).
    pub const PLT: u8 = 3;
    /// CFA = *(rbp + offset): a function that realigned its stack (`DW_OP_breg6; DW_OP_deref`).
    pub const DEREF_RBP: u8 = 4;
    /// The return address is undefined: the outermost frame (`_start`, `clone3`).
    pub const END: u8 = 5;
    /// A signal trampoline (`__restore_rt`): the interrupted registers are in the
    /// `ucontext_t` at rsp (see [`super::signal_frame`]).
    pub const SIGNAL: u8 = 6;
    /// CFA = rsp + 8 × offset: a frame too large for the plain offset (more than 32 KiB of
    /// locals; frame sizes are multiples of 8).
    pub const RSP_SCALED: u8 = 7;
}

/// How the caller's rbp is found, high nibble of [`UnwindRow::rules`].
pub mod rbp {
    /// rbp is unchanged.
    pub const SAME: u8 = 0;
    /// rbp was saved at CFA + 8 × `rbp_offset`.
    pub const AT_CFA: u8 = 1;
    /// rbp was saved at rbp + 8 × `rbp_offset` (realigned frames: `DW_OP_breg6`).
    pub const AT_RBP: u8 = 2;
    /// rbp cannot be recovered: the caller's rbp is taken as unknown (0).
    pub const UNDEFINED: u8 = 3;
}

/// Where `__restore_rt` finds the interrupted registers: offsets from rsp into the
/// `ucontext_t` the kernel pushed (x86-64 `uc_mcontext.gregs`).
pub mod signal_frame {
    /// Offset of the saved rbp.
    pub const RBP: u64 = 120;
    /// Offset of the saved rsp.
    pub const RSP: u64 = 160;
    /// Offset of the saved rip.
    pub const RIP: u64 = 168;
}

/// One row of an unwind table, 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    /// First address the row holds for (low 32 bits of the ELF virtual address).
    pub pc: u32,
    /// The CFA's offset from its register (see [`cfa`]).
    pub cfa_offset: i16,
    /// rbp's slot in units of 8 bytes (see [`rbp`]), or the PLT threshold.
    pub rbp_offset: i8,
    /// `cfa` kind in the low nibble, `rbp` kind in the high nibble.
    pub rules: u8,
}

impl UnwindRow {
    /// A row from its parts.
    pub const fn new(pc: u32, cfa_kind: u8, cfa_offset: i16, rbp_kind: u8, rbp_offset: i8) -> Self {
        Self {
            pc,
            cfa_offset,
            rbp_offset,
            rules: (cfa_kind & 0xf) | (rbp_kind << 4),
        }
    }

    /// The CFA kind, one of [`cfa`].
    pub const fn cfa_kind(&self) -> u8 {
        self.rules & 0xf
    }

    /// The rbp kind, one of [`rbp`].
    pub const fn rbp_kind(&self) -> u8 {
        self.rules >> 4
    }
}

/// Most executable mappings the probe searches per process (more are left out).
pub const MAX_MAPPINGS: usize = 1024;

/// One executable mapping of a process, as the probe's unwinder sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Process address − bias = the file's virtual address (what rows hold).
    pub bias: u64,
    /// Index of the table's first row in `UNWIND_ROWS`.
    pub table_start: u32,
    /// Rows in the table; 0: no table (walk this mapping with frame pointers).
    pub table_len: u32,
}

/// Where a process's executable mappings are: a run of `count` entries of the probe's
/// `MAPPINGS` array from index `first`, sorted by start address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessMappings {
    /// Index of the first mapping in `MAPPINGS`.
    pub first: u32,
    /// How many mappings.
    pub count: u32,
}

/// How a sample's user stack was walked, and why it ended (`SampleHeader::unwind_outcome`).
pub mod outcome {
    /// Walked with frame pointers only (`unwinder = "frame-pointer"`, or a kernel thread).
    pub const FRAME_POINTERS: u32 = 0;
    /// CFI all the way to the outermost frame (`_start`, `clone3`).
    pub const END_OF_STACK: u32 = 1;
    /// Reached its end after one or more frame-pointer steps where no row was known.
    pub const FELL_BACK_TO_FRAME_POINTERS: u32 = 2;
    /// The process's tables were not loaded yet: frame pointers for this sample.
    pub const NO_TABLE_YET: u32 = 3;
    /// Cut at `max_stack_depth`.
    pub const DEPTH_LIMIT: u32 = 4;
    /// A read of the user stack failed, or an address fell outside every mapping.
    pub const READ_ERROR: u32 = 5;
    /// Number of outcomes.
    pub const COUNT: u32 = 6;
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (8 bytes: u32 + i16 + i8 + u8).
unsafe impl aya::Pod for UnwindRow {}
#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (3 × u64 + 2 × u32).
unsafe impl aya::Pod for ExecMapping {}
#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (2 × u32).
unsafe impl aya::Pod for ProcessMappings {}
