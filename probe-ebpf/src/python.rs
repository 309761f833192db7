//! CPython's frames, spliced into the user stack where the native unwinder meets the
//! interpreter loop (`_PyEval_EvalFrameDefault`).
//!
//! The first time a sample's walk reaches the loop, the thread's state is found: cached per
//! thread, else searched in the interpreter's list of thread states by the thread id the
//! process sees (its pid namespace's). Its current frame starts the chain. At each native
//! frame of the loop, the frames that run of the loop executes are written in place of the
//! native frame: from the current one down to the loop's entry frame (`is_entry` in 3.11, a
//! frame owned by the C stack from 3.12 on), whose predecessor belongs to the next run of the
//! loop further down the native stack. Then the native unwinder goes on with the caller.

use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_get_ns_current_pid_tgid,
    },
    macros::perf_event,
    programs::PerfEventContext,
};
use probe_common::{
    python::{encode_frame, PythonProcess, NO_OFFSET},
    unwind::outcome,
    SampleEvent, MAX_STACK_DEPTH,
};

use crate::{
    maps::*,
    unwinding::{finish, UnwindState},
};

/// Python frames written per program run.
const FRAMES_PER_RUN: u32 = 32;
/// Thread states searched for the sampled thread's.
const MAX_THREADS: u32 = 64;

/// Where the Python walk of a sample stands (in [`UnwindState`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PythonCursor {
    /// The process's CPython facts.
    pub process: PythonProcess,
    /// The next frame to write (`_PyInterpreterFrame *`); 0 when there is none.
    pub frame: u64,
    /// One of [`phase`].
    pub phase: u32,
    /// 1 when the Python walk for the native frame at the unwinder's pc is done.
    pub walked: u32,
    /// The sample's user frames when that walk began: more when it wrote Python frames,
    /// which then stand in for the native frame; none, and the native frame stays.
    pub frames_before_walk: u32,
}

/// How far a sample's Python walk is.
pub mod phase {
    /// Not a CPython process.
    pub const NONE: u32 = 0;
    /// A CPython process whose thread state was not looked up yet.
    pub const FIND_THREAD: u32 = 1;
    /// Walking (`frame` is the next one).
    pub const WALKING: u32 = 2;
}

impl PythonCursor {
    /// Starts the walk for the native frame at the unwinder's pc, with `user_frames` frames
    /// in the sample so far.
    #[inline(always)]
    pub fn begin_walk(&mut self, user_frames: u32) {
        self.frames_before_walk = user_frames;
    }

    /// Whether the native frame at the unwinder's pc gives way to the Python frames its
    /// walk wrote (the sample now has `user_frames`); ends that frame's walk either way.
    #[inline(always)]
    pub fn take_replaced(&mut self, user_frames: u32) -> bool {
        let replaced = self.walked != 0 && user_frames > self.frames_before_walk;
        self.walked = 0;
        replaced
    }

    /// Whether the native frame whose (call) address is `lookup` is a run of the interpreter
    /// loop whose Python frames are still to be written.
    #[inline(always)]
    pub fn wants(&self, lookup: u64) -> bool {
        self.walked == 0
            && (self.phase == phase::FIND_THREAD
                || (self.phase == phase::WALKING && self.frame != 0))
            && self.process.eval_start <= lookup
            && lookup < self.process.eval_end
    }
}

#[perf_event]
pub fn walk_python(ctx: PerfEventContext) -> u32 {
    let (Some(event), Some(state)) = (SCRATCH.get_ptr_mut(0), UNWIND_STATE.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's scratch and state slots, used by this chain of tail calls alone.
    unsafe {
        let state = &mut *state;
        if state.python.phase == phase::FIND_THREAD {
            state.python.frame = current_frame(&state.python.process).unwrap_or(0);
            state.python.phase = phase::WALKING;
        }
        if write_frames(state, event) {
            PROGRAMS.tail_call(&ctx, PYTHON_WALKER);
        } else {
            state.python.walked = 1;
            PROGRAMS.tail_call(&ctx, UNWINDER);
        }
        // The kernel's tail-call limit: what was unwound so far is kept.
        finish(event, state, outcome::DEPTH_LIMIT);
    }
    0
}

/// Writes up to `FRAMES_PER_RUN` frames of this run of the loop; true when more follow.
fn write_frames(state: &mut UnwindState, event: *mut SampleEvent) -> bool {
    let offsets = state.python.process.offsets;
    let wanted = setting(&FRAMES_WANTED).min(MAX_STACK_DEPTH as u32);
    for _ in 0..FRAMES_PER_RUN {
        let frame = state.python.frame;
        if frame == 0 || state.user_frames >= wanted {
            return false;
        }
        let Ok(previous) = read(frame + u64::from(offsets.frame_previous)) else {
            state.python.frame = 0;
            return false;
        };
        if offsets.frame_is_entry == NO_OFFSET {
            // 3.12 on: the loop's entry frame lives on the C stack and runs no code.
            let owner = read_byte(frame + u64::from(offsets.frame_owner)).unwrap_or(0);
            if owner == offsets.owned_by_cstack {
                state.python.frame = previous;
                return false;
            }
        }
        let (Ok(code), Ok(instruction)) = (
            read(frame + u64::from(offsets.frame_code)),
            read(frame + u64::from(offsets.frame_instr)),
        ) else {
            state.python.frame = 0;
            return false;
        };
        let first = code + u64::from(offsets.code_adaptive);
        let index = if instruction > first {
            (instruction - first) / 2
        } else {
            0
        };
        // Masked, so that the verifier knows its bounds whatever register holds it.
        let slot = ((state.kernel_frames + state.user_frames) & 0xff) as usize;
        // SAFETY: this CPU's scratch slot; the index is checked by `get_mut`.
        match unsafe { (*event).frames.get_mut(slot) } {
            Some(word) => *word = encode_frame(code, index),
            None => return false,
        }
        state.user_frames += 1;
        state.python.frame = previous;
        if offsets.frame_is_entry != NO_OFFSET
            && read_byte(frame + u64::from(offsets.frame_is_entry)).unwrap_or(1) != 0
        {
            // 3.11: the first frame of this run of the loop.
            return false;
        }
    }
    true
}

/// The sampled thread's current frame: its thread state (cached per thread, else found in
/// the interpreter's list), then the frame it executes.
fn current_frame(process: &PythonProcess) -> Option<u64> {
    let offsets = &process.offsets;
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper fills `ns`, of the size given.
    let found = unsafe {
        bpf_get_ns_current_pid_tgid(
            process.pid_ns_dev,
            process.pid_ns_ino,
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    if found != 0 {
        return None;
    }
    let thread_id = u64::from(ns.pid);
    let tid = bpf_get_current_pid_tgid() as u32;
    let native_id = u64::from(offsets.tstate_native_thread_id);
    // SAFETY: lookup of a plain u32 key.
    let cached = unsafe { PYTHON_THREADS.get(&tid) }
        .copied()
        .filter(|&tstate| read(tstate + native_id) == Ok(thread_id));
    let tstate = match cached {
        Some(tstate) => tstate,
        None => {
            let interpreter =
                read(process.runtime + u64::from(offsets.runtime_interpreters_head)).ok()?;
            let mut tstate = read(interpreter + u64::from(offsets.interp_threads_head)).ok()?;
            let mut found = 0;
            for _ in 0..MAX_THREADS {
                if tstate == 0 {
                    break;
                }
                if read(tstate + native_id) == Ok(thread_id) {
                    found = tstate;
                    break;
                }
                tstate = read(tstate + u64::from(offsets.tstate_next)).ok()?;
            }
            if found == 0 {
                return None;
            }
            let _ = PYTHON_THREADS.insert(&tid, &found, 0);
            found
        }
    };
    let holder = if offsets.tstate_cframe == NO_OFFSET {
        tstate
    } else {
        read(tstate + u64::from(offsets.tstate_cframe)).ok()?
    };
    read(holder + u64::from(offsets.current_frame)).ok()
}

/// Eight bytes of user memory.
#[inline(always)]
fn read(address: u64) -> Result<u64, i32> {
    // SAFETY: the checked user-read helper; a fault is an error, not a crash.
    unsafe { bpf_probe_read_user(address as *const u64) }
}

/// One byte of user memory.
#[inline(always)]
fn read_byte(address: u64) -> Result<u8, i32> {
    // SAFETY: the checked user-read helper.
    unsafe { bpf_probe_read_user(address as *const u8) }
}
