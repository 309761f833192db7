//! What the probe needs to walk a CPython process's frames, and how it reports them.
//!
//! The router finds CPython in a process (its `_PyRuntime` and the range of the interpreter
//! loop `_PyEval_EvalFrameDefault`) and writes a [`PythonProcess`] for it. Where the native
//! unwinder meets the interpreter loop, the probe walks the thread's Python frames from its
//! thread state up to the frame that entered that run of the loop, and puts them in the
//! sample's user stack in place of the loop's native frame, each as one tagged word
//! ([`encode_frame`]): the code object and the index of its executing instruction, which
//! the router turns into a function, a file and a line.

/// Offsets into CPython's internal structures (bytes), for one minor version.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonOffsets {
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u16,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u16,
    /// `PyThreadState.next`.
    pub tstate_next: u16,
    /// `PyThreadState.native_thread_id`.
    pub tstate_native_thread_id: u16,
    /// `PyThreadState.cframe` (3.11, 3.12), or [`NO_OFFSET`] when the thread state holds
    /// the current frame itself (3.13).
    pub tstate_cframe: u16,
    /// `_PyCFrame.current_frame` (3.11, 3.12), else `PyThreadState.current_frame`.
    pub current_frame: u16,
    /// `_PyInterpreterFrame.previous`.
    pub frame_previous: u16,
    /// `_PyInterpreterFrame.f_code` / `f_executable`.
    pub frame_code: u16,
    /// `_PyInterpreterFrame.prev_instr` / `instr_ptr`.
    pub frame_instr: u16,
    /// `_PyInterpreterFrame.owner`.
    pub frame_owner: u16,
    /// `_PyInterpreterFrame.is_entry` (3.11), or [`NO_OFFSET`] where the loop's entry is a
    /// frame owned by the C stack (3.12 on).
    pub frame_is_entry: u16,
    /// `PyCodeObject.co_code_adaptive`: the first instruction.
    pub code_adaptive: u16,
    /// The `owner` of the loop's entry frame (`FRAME_OWNED_BY_CSTACK`), 3.12 on.
    pub owned_by_cstack: u8,
    /// Padding.
    pub reserved: [u8; 7],
}

/// An offset that does not exist in this version.
pub const NO_OFFSET: u16 = u16::MAX;

/// A CPython process, as the probe walks it (map `PYTHON_PROCESSES`, by pid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonProcess {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// First address of `_PyEval_EvalFrameDefault`.
    pub eval_start: u64,
    /// One past its last address.
    pub eval_end: u64,
    /// Device of the process's pid namespace (`/proc/PID/ns/pid`), for thread ids as the
    /// process sees them.
    pub pid_ns_dev: u64,
    /// Inode of the process's pid namespace.
    pub pid_ns_ino: u64,
    /// The version's offsets.
    pub offsets: PythonOffsets,
}

/// Set in a user-stack word that holds a Python frame (user addresses never have it).
pub const FRAME_TAG: u64 = 1 << 63;
/// Bits of the code object's address (shifted right by 3: objects are 8-byte aligned).
const CODE_BITS: u32 = 44;
/// Largest instruction index a word holds (19 bits); later ones are saturated.
pub const MAX_INSTRUCTION: u64 = (1 << (63 - CODE_BITS)) - 1;

/// The user-stack word of a Python frame: code object `code`, executing instruction
/// `instruction` (an index in code units).
#[inline(always)]
pub fn encode_frame(code: u64, instruction: u64) -> u64 {
    let instruction = if instruction > MAX_INSTRUCTION {
        MAX_INSTRUCTION
    } else {
        instruction
    };
    FRAME_TAG | (instruction << CODE_BITS) | ((code >> 3) & ((1 << CODE_BITS) - 1))
}

/// The code object and instruction index of a Python frame's word; `None` for a native
/// address.
pub fn decode_frame(word: u64) -> Option<(u64, u32)> {
    (word & FRAME_TAG != 0).then(|| {
        let code = (word & ((1 << CODE_BITS) - 1)) << 3;
        let instruction = ((word & !FRAME_TAG) >> CODE_BITS) as u32;
        (code, instruction)
    })
}

#[cfg(feature = "user")]
// SAFETY: plain old data: five u64 and 13 u16 + u8 + 7 bytes of explicit padding (32 bytes).
unsafe impl aya::Pod for PythonProcess {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_word_round_trips_and_never_looks_like_an_address() {
        let code = 0x7f12_3456_7890;
        let word = encode_frame(code, 1234);
        assert_eq!(decode_frame(word), Some((code, 1234)));
        assert_eq!(decode_frame(0x7f12_3456_7890), None);
        assert_eq!(
            decode_frame(encode_frame(code, u64::MAX)),
            Some((code, MAX_INSTRUCTION as u32))
        );
        assert_eq!(core::mem::size_of::<PythonOffsets>(), 32);
    }
}
