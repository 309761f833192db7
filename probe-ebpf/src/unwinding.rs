//! The user stack unwound with CFI rows (the router's tables of each executable's
//! `.eh_frame`), starting from the registers the task had in user mode.
//!
//! Per frame: find the executable mapping of the pc, binary-search its table for the row of
//! the pc, compute the canonical frame address (the caller's stack pointer), read the return
//! address below it and the caller's rbp where the row says, and go on with the caller. Where
//! a mapping has no table or a row has no rule, one frame-pointer step stands in. The walk
//! stops at the outermost frame, a zero or kernel address, a stack pointer that does not
//! grow, a failed read or `max_stack_depth`. One program run unwinds `FRAMES_PER_RUN` frames
//! and tail-calls itself for the next ones, which keeps each run small for the verifier.
//!
//! Both searches index arrays through map lookups, not pointer arithmetic: the verifier then
//! need not track the exact bounds of the search, and the states of its iterations merge.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_probe_read_user as bpf_probe_read_user_raw,
            bpf_task_pt_regs,
        },
    },
    macros::perf_event,
    programs::PerfEventContext,
    EbpfContext,
};
use probe_common::{
    python::PythonProcess,
    unwind::{cfa, outcome, rbp, signal_frame, ExecMapping, ProcessMappings, UnwindRow},
    SampleEvent, MAX_STACK_DEPTH,
};

use crate::{
    maps::*,
    python::{phase, PythonCursor},
    sampling::submit,
};

/// Frames unwound per program run.
const FRAMES_PER_RUN: u32 = 16;
/// Steps of the binary search over a process's mappings (2^11 > `MAX_MAPPINGS`).
const MAPPING_SEARCH_STEPS: u32 = 11;
/// Steps of the binary search over a table's rows (tables of up to 2^24 rows).
const ROW_SEARCH_STEPS: u32 = 24;
/// User addresses are below this (x86-64, 4-level and 5-level paging).
const USER_SPACE_END: u64 = 0x0100_0000_0000_0000;
/// Not an outcome: the walk reached the interpreter loop, whose Python frames come next.
const WALK_PYTHON: u32 = u32::MAX;

/// The unwinder's registers and progress, kept per CPU between tail calls.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UnwindState {
    pc: u64,
    sp: u64,
    bp: u64,
    /// Kernel frames already in the sample; user frames go after them.
    pub kernel_frames: u32,
    /// User frames recorded so far (native and Python).
    pub user_frames: u32,
    /// Frame-pointer steps taken where no row was known.
    fp_steps: u32,
    /// Native frames unwound so far.
    native_frames: u32,
    /// Where the process's mappings are (copied once per sample, not looked up per run).
    process: ProcessMappings,
    /// The Python walk, for a CPython process.
    pub python: PythonCursor,
    /// The part of the user stack read last.
    window: StackWindow,
}

/// Words of user stack read at once.
const WINDOW_WORDS: usize = 64;

/// A copy of a piece of the user stack: a frame's reads mostly fall into the piece its
/// callee's reads brought in, so a walk costs a few reads of user memory, not one per word.
#[repr(C)]
#[derive(Clone, Copy)]
struct StackWindow {
    start: u64,
    /// Bytes copied from `start`; 0: nothing yet.
    len: u64,
    words: [u64; WINDOW_WORDS],
}

impl StackWindow {
    /// The word at `address` (8-aligned ones from the window, read in when missing).
    #[inline(always)]
    fn read(&mut self, address: u64) -> Result<u64, u32> {
        if address & 7 != 0 {
            return read(address);
        }
        let offset = address.wrapping_sub(self.start);
        if offset < self.len {
            if let Some(word) = self.words.get((offset / 8) as usize) {
                return Ok(*word);
            }
        }
        // From `address` on, never into the next page: that one may not be mapped.
        let len = (4096 - (address & 4095)).min(WINDOW_WORDS as u64 * 8);
        // SAFETY: the checked user-read helper into this CPU's state slot, at most its size.
        let result = unsafe {
            bpf_probe_read_user_raw(
                self.words.as_mut_ptr().cast(),
                len as u32,
                address as *const _,
            )
        };
        if result != 0 {
            self.len = 0;
            return Err(outcome::READ_ERROR);
        }
        self.start = address;
        self.len = len;
        Ok(self.words[0])
    }
}

/// Seeds the unwinder with the task's user registers; false when they cannot be read.
///
/// # Safety
/// Called from the sampling program of this CPU, before it tail-calls the unwinder.
pub unsafe fn begin(
    ctx: &PerfEventContext,
    process: ProcessMappings,
    python: Option<&PythonProcess>,
    kernel_frames: u32,
) -> bool {
    let Some(state) = UNWIND_STATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the perf event's context starts with the interrupted registers.
    let interrupted = unsafe { &*(ctx.as_ptr() as *const pt_regs) };
    let (pc, sp, bp) = if interrupted.cs & 3 == 3 {
        // The sample interrupted user mode: those are the user registers.
        (interrupted.rip, interrupted.rsp, interrupted.rbp)
    } else {
        // In the kernel: the task's user registers, saved at the top of its kernel stack
        // when it entered, read with the checked kernel-read helper.
        // SAFETY: the helpers take the current task; the read is checked.
        let saved = unsafe {
            let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
            bpf_probe_read_kernel(regs)
        };
        let Ok(saved) = saved else {
            return false;
        };
        (saved.rip, saved.rsp, saved.rbp)
    };
    // SAFETY: this CPU's slot; the window's words stay as they are (its length says none
    // is valid), which spares clearing 512 bytes per sample.
    unsafe {
        (*state).pc = pc;
        (*state).sp = sp;
        (*state).bp = bp;
        (*state).kernel_frames = kernel_frames;
        (*state).user_frames = 0;
        (*state).fp_steps = 0;
        (*state).native_frames = 0;
        (*state).process = process;
        (*state).window.len = 0;
        (*state).python.walked = 0;
        (*state).python.frame = 0;
        match python {
            Some(python) => {
                (*state).python.process = *python;
                (*state).python.phase = phase::FIND_THREAD;
            }
            None => (*state).python.phase = phase::NONE,
        }
    }
    true
}

#[perf_event]
pub fn unwind_user(ctx: PerfEventContext) -> u32 {
    let (Some(event), Some(state)) = (SCRATCH.get_ptr_mut(0), UNWIND_STATE.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's scratch and state slots, used by this chain of tail calls alone.
    unsafe {
        match unwind_some(&mut *state, event) {
            Some(WALK_PYTHON) => {
                PROGRAMS.tail_call(&ctx, PYTHON_WALKER);
                finish(event, &*state, outcome::DEPTH_LIMIT);
            }
            Some(how) => finish(event, &*state, how),
            None => {
                PROGRAMS.tail_call(&ctx, UNWINDER);
                // The kernel's tail-call limit: what was unwound so far is kept.
                finish(event, &*state, outcome::DEPTH_LIMIT);
            }
        }
    }
    0
}

/// Unwinds up to `FRAMES_PER_RUN` frames; the outcome once the walk has ended.
fn unwind_some(state: &mut UnwindState, event: *mut SampleEvent) -> Option<u32> {
    let process = state.process;
    let wanted = setting(&FRAMES_WANTED).min(MAX_STACK_DEPTH as u32);
    // Callers are mostly in the same file as their callee: the last mapping is tried first.
    let mut last_mapping = None;
    for _ in 0..FRAMES_PER_RUN {
        if let Err(how) = step(&process, state, event, wanted, &mut last_mapping) {
            return Some(how);
        }
    }
    None
}

/// Records the frame at `state.pc` and moves `state` to its caller; `Err(outcome)` when the
/// walk ends here.
#[inline(always)]
fn step(
    process: &ProcessMappings,
    state: &mut UnwindState,
    event: *mut SampleEvent,
    wanted: u32,
    last_mapping: &mut Option<&'static ExecMapping>,
) -> Result<(), u32> {
    let depth = state.user_frames;
    if depth >= wanted {
        return Err(outcome::DEPTH_LIMIT);
    }
    let pc = state.pc;
    if pc == 0 {
        return Err(ended(state));
    }
    if pc >= USER_SPACE_END {
        return Err(outcome::READ_ERROR);
    }
    // A return address points after its call: look up the call itself.
    let leaf = state.native_frames == 0;
    let lookup = if leaf { pc } else { pc - 1 };
    if state.python.wants(lookup) {
        state.python.begin_walk(depth);
        return Err(WALK_PYTHON);
    }
    // A run of the interpreter loop whose walk wrote Python frames is in the sample as
    // those; one whose walk found none (no thread state, unreadable memory) stays native.
    if !state.python.take_replaced(depth) {
        let slot = (state.kernel_frames + depth) as usize;
        // SAFETY: this CPU's scratch slot; the index is checked by `get_mut`.
        match unsafe { (*event).frames.get_mut(slot) } {
            Some(frame) => *frame = pc,
            None => return Err(outcome::DEPTH_LIMIT),
        }
        state.user_frames = depth + 1;
    }
    state.native_frames += 1;
    // Outside every known mapping, the walk ends with the address recorded: user space
    // re-reads the process's mappings when it sees one (an exec, a library loaded since)
    // and drops the address if it is in none (a frame-pointer step read garbage).
    let mapping = match last_mapping.filter(|m| m.start <= lookup && lookup < m.end) {
        Some(mapping) => mapping,
        None => {
            let Some(mapping) = find_mapping(process, lookup) else {
                return Err(if leaf {
                    outcome::NO_TABLE_YET
                } else {
                    outcome::READ_ERROR
                });
            };
            *last_mapping = Some(mapping);
            mapping
        }
    };

    let row = find_row(mapping, lookup.wrapping_sub(mapping.bias));
    let (kind, cfa_offset, rbp_kind, rbp_offset) = match row {
        Some(row) => (
            row.cfa_kind(),
            i64::from(row.cfa_offset),
            row.rbp_kind(),
            i64::from(row.rbp_offset),
        ),
        None => (cfa::NONE, 0, rbp::SAME, 0),
    };
    let sp = state.sp;
    let bp = state.bp;
    let frame_address = match kind {
        cfa::END => return Err(ended(state)),
        cfa::SIGNAL => {
            // The interrupted code's registers, from the ucontext_t the kernel pushed.
            state.pc = state.window.read(sp + signal_frame::RIP)?;
            state.sp = state.window.read(sp + signal_frame::RSP)?;
            state.bp = state.window.read(sp + signal_frame::RBP)?;
            return Ok(());
        }
        cfa::RSP => sp.wrapping_add(cfa_offset as u64),
        cfa::RSP_SCALED => sp.wrapping_add((cfa_offset * 8) as u64),
        cfa::RBP => bp.wrapping_add(cfa_offset as u64),
        cfa::PLT => {
            let past_push = if (pc & 15) as i64 >= rbp_offset { 8 } else { 0 };
            sp.wrapping_add((cfa_offset + past_push) as u64)
        }
        cfa::DEREF_RBP => state.window.read(bp.wrapping_add(cfa_offset as u64))?,
        _ => {
            // No rule here: one frame-pointer step (rbp points at the saved rbp, the return
            // address above it).
            if bp == 0 {
                return Err(ended(state));
            }
            state.fp_steps += 1;
            state.pc = state.window.read(bp + 8)?;
            state.bp = state.window.read(bp)?;
            state.sp = bp + 16;
            return if state.sp > sp {
                Ok(())
            } else {
                Err(outcome::READ_ERROR)
            };
        }
    };
    if frame_address <= sp {
        return Err(outcome::READ_ERROR);
    }
    let return_address = state.window.read(frame_address - 8)?;
    let caller_bp = match rbp_kind {
        rbp::SAME => bp,
        rbp::AT_CFA => state
            .window
            .read(frame_address.wrapping_add((rbp_offset * 8) as u64))?,
        rbp::AT_RBP => state
            .window
            .read(bp.wrapping_add((rbp_offset * 8) as u64))?,
        _ => 0,
    };
    state.bp = caller_bp;
    state.pc = return_address;
    state.sp = frame_address;
    Ok(())
}

/// The outcome of a walk that reached the outermost frame.
fn ended(state: &UnwindState) -> u32 {
    if state.fp_steps == 0 {
        outcome::END_OF_STACK
    } else {
        outcome::FELL_BACK_TO_FRAME_POINTERS
    }
}

/// Eight bytes of user memory.
#[inline(always)]
fn read(address: u64) -> Result<u64, u32> {
    // SAFETY: the checked user-read helper; a fault is an error, not a crash.
    unsafe { bpf_probe_read_user(address as *const u64) }.map_err(|_| outcome::READ_ERROR)
}

/// The executable mapping holding `pc` (a binary search over the process's sorted run).
#[inline(always)]
fn find_mapping(process: &ProcessMappings, pc: u64) -> Option<&'static ExecMapping> {
    let index = last_at_or_before(process.count, MAPPING_SEARCH_STEPS, pc, |i| {
        MAPPINGS.get(process.first + i).map(|m| m.start)
    })?;
    let mapping = MAPPINGS.get(process.first + index)?;
    (pc < mapping.end).then_some(mapping)
}

/// The row of `mapping`'s table that holds `vaddr` (the last one starting at or before it).
#[inline(always)]
fn find_row(mapping: &ExecMapping, vaddr: u64) -> Option<&'static UnwindRow> {
    if vaddr > u64::from(u32::MAX) {
        return None;
    }
    let index = last_at_or_before(mapping.table_len, ROW_SEARCH_STEPS, vaddr, |i| {
        UNWIND_ROWS
            .get(mapping.table_start + i)
            .map(|row| u64::from(row.pc))
    })?;
    UNWIND_ROWS.get(mapping.table_start + index)
}

/// The index of the last of `count` entries sorted by `key` whose key is at most `x`, in at
/// most `steps` halvings; `None` when the first one is already past `x`.
#[inline(always)]
fn last_at_or_before(
    count: u32,
    steps: u32,
    x: u64,
    key: impl Fn(u32) -> Option<u64>,
) -> Option<u32> {
    let mut low = 0u32;
    let mut high = count;
    for _ in 0..steps {
        if low >= high {
            break;
        }
        let middle = low + (high - low) / 2;
        if key(middle)? <= x {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low.checked_sub(1)
}

/// Counts the outcome and sends the sample with the frames unwound so far.
///
/// # Safety
/// `event` and `state` are this CPU's slots.
pub unsafe fn finish(event: *mut SampleEvent, state: &UnwindState, how: u32) {
    // SAFETY: this CPU's slot.
    unsafe {
        (*event).header.user_stack_bytes = (state.user_frames * 8) as i32;
        (*event).header.unwind_outcome = how;
        submit(event);
    }
}
