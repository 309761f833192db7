//! Where CPython keeps what a profiler reads, per minor version: byte offsets into its
//! internal structs, read from the headers of each version (router/tests/python_layout.rs
//! compiles router/tests/fixtures/python_layout.c against them and compares).
//!
//! The chain the probe walks: `_PyRuntime` → `interpreters.head` → `threads.head` (then
//! `next`) → the thread whose `native_thread_id` is the sampled tid → its current
//! `_PyInterpreterFrame` (through `cframe` in 3.11 and 3.12) → `previous` … ; each frame's
//! code object and instruction pointer become a function, a file and a line
//! ([`super::CodeReader`]).
//!
//! Only the default (GIL) x86-64 builds: a free-threaded 3.13 (`python3.13t`) lays its
//! objects out differently and is refused by [`super::detect`].

/// Offsets (bytes) into CPython's internal structs for one minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PythonLayout {
    /// The minor version: 11, 12 or 13 (of 3.x).
    pub minor: u32,
    /// `offsetof(_PyRuntimeState, interpreters.head)`: the newest `PyInterpreterState*`.
    pub runtime_interpreters_head: u16,
    /// `offsetof(PyInterpreterState, threads.head)`: the newest `PyThreadState*`.
    pub interp_threads_head: u16,
    /// `offsetof(PyThreadState, next)`: the next (older) thread state.
    pub tstate_next: u16,
    /// `offsetof(PyThreadState, native_thread_id)`: the kernel tid (`unsigned long`), as the
    /// process's pid namespace numbers it.
    pub tstate_native_thread_id: u16,
    /// `offsetof(PyThreadState, cframe)` (a `_PyCFrame*`) in 3.11 and 3.12; `None` in 3.13,
    /// where the thread state holds the current frame itself.
    pub tstate_cframe: Option<u16>,
    /// Where the current `_PyInterpreterFrame*` is: `offsetof(_PyCFrame, current_frame)` in
    /// 3.11 and 3.12, `offsetof(PyThreadState, current_frame)` in 3.13.
    pub cframe_current_frame: u16,
    /// `offsetof(_PyInterpreterFrame, previous)`: the calling frame.
    pub frame_previous: u16,
    /// `offsetof(_PyInterpreterFrame, f_code)` (3.11, 3.12) / `f_executable` (3.13): the
    /// `PyCodeObject*` (in 3.13 possibly `None` or another object; check `owner`).
    pub frame_code: u16,
    /// `offsetof(_PyInterpreterFrame, prev_instr)` (3.11, 3.12) / `instr_ptr` (3.13): the
    /// `_Py_CODEUNIT*` of the executing instruction (3.11 and 3.12 may point at its last
    /// inline cache entry, which has the same location; at a frame's start, one unit before
    /// the code).
    pub frame_instr: u16,
    /// `offsetof(_PyInterpreterFrame, owner)`: a `char`, see [`FRAME_OWNED_BY_THREAD`] etc.
    pub frame_owner: u16,
    /// `offsetof(_PyInterpreterFrame, is_entry)` in 3.11: a `bool` set on the first frame an
    /// eval loop call runs (its `previous` was pushed by another C call). `None` from 3.12,
    /// where such a boundary is an extra frame owned by [`PythonLayout::owned_by_cstack`].
    pub frame_is_entry: Option<u16>,
    /// `FRAME_OWNED_BY_CSTACK`: the `owner` of the eval loop's own entry frame in 3.12 and
    /// 3.13 (3), which holds no Python code; 0 (unused) in 3.11, which has no such frame.
    pub owned_by_cstack: u8,
    /// `offsetof(PyCodeObject, co_code_adaptive)`: where the code units start.
    pub code_adaptive: u16,
    /// `offsetof(PyCodeObject, co_qualname)`: a `str*`, like `K.method`.
    pub code_qualname: u16,
    /// `offsetof(PyCodeObject, co_name)`: a `str*`, like `method`.
    pub code_name: u16,
    /// `offsetof(PyCodeObject, co_filename)`: a `str*`.
    pub code_filename: u16,
    /// `offsetof(PyCodeObject, co_firstlineno)`: an `int`.
    pub code_firstlineno: u16,
    /// `offsetof(PyCodeObject, co_linetable)`: a `bytes*` holding the location table.
    pub code_linetable: u16,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII `str`'s characters start.
    pub unicode_ascii_data: u16,
    /// `sizeof(PyCompactUnicodeObject)`: where the data of other compact `str`s start.
    pub unicode_compact_data: u16,
    /// `offsetof(PyASCIIObject, state)`: the 32-bit bitfield word (see [`STATE_KIND_SHIFT`]).
    pub unicode_state: u16,
    /// `offsetof(PyASCIIObject, length)`: the length in code points (`Py_ssize_t`).
    pub unicode_length: u16,
    /// `offsetof(PyBytesObject, ob_sval)`: where a `bytes`'s data start.
    pub bytes_data: u16,
    /// `offsetof(PyVarObject, ob_size)`: a `bytes`'s length (`Py_ssize_t`).
    pub bytes_size: u16,
}

/// `_Py_CODEUNIT` is 2 bytes (opcode, oparg) in every supported version.
pub const CODE_UNIT_SIZE: u64 = 2;

/// `owner` of a frame run by a thread's eval loop.
pub const FRAME_OWNED_BY_THREAD: u8 = 0;
/// `owner` of a generator's or coroutine's frame.
pub const FRAME_OWNED_BY_GENERATOR: u8 = 1;
/// `owner` of a frame that outlived its call, kept by its frame object.
pub const FRAME_OWNED_BY_FRAME_OBJECT: u8 = 2;

/// `PyASCIIObject.state`: the `kind` bits (1 = latin-1, 2 = UCS-2, 4 = UCS-4) start here …
pub const STATE_KIND_SHIFT: u32 = 2;
/// … and are this wide once shifted down (3 bits).
pub const STATE_KIND_MASK: u32 = 0b111;
/// `PyASCIIObject.state`: the `compact` bit (the data follow the object header).
pub const STATE_COMPACT_BIT: u32 = 5;
/// `PyASCIIObject.state`: the `ascii` bit (then the data start at
/// [`PythonLayout::unicode_ascii_data`], else at [`PythonLayout::unicode_compact_data`]).
pub const STATE_ASCII_BIT: u32 = 6;

/// CPython 3.11 (identical from 3.11.0 to 3.11.x: Debian's 3.11.2 and pyenv's 3.11.7 agree).
static PYTHON_3_11: PythonLayout = PythonLayout {
    minor: 11,
    runtime_interpreters_head: 40,
    interp_threads_head: 16,
    tstate_next: 8,
    tstate_native_thread_id: 160,
    tstate_cframe: Some(56),
    cframe_current_frame: 8,
    frame_previous: 48,
    frame_code: 32,
    frame_instr: 56,
    frame_owner: 69,
    frame_is_entry: Some(68),
    owned_by_cstack: 0,
    code_adaptive: 184,
    code_qualname: 128,
    code_name: 120,
    code_filename: 112,
    code_firstlineno: 72,
    code_linetable: 136,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    unicode_state: 32,
    unicode_length: 16,
    bytes_data: 32,
    bytes_size: 16,
};

/// CPython 3.12 (`wstr` left `str`; `_PyInterpreterFrame` starts with `f_code`).
static PYTHON_3_12: PythonLayout = PythonLayout {
    minor: 12,
    runtime_interpreters_head: 40,
    interp_threads_head: 72,
    tstate_next: 8,
    tstate_native_thread_id: 144,
    tstate_cframe: Some(56),
    cframe_current_frame: 0,
    frame_previous: 8,
    frame_code: 0,
    frame_instr: 56,
    frame_owner: 70,
    frame_is_entry: None,
    owned_by_cstack: 3,
    code_adaptive: 192,
    code_qualname: 128,
    code_name: 120,
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    unicode_state: 32,
    unicode_length: 16,
    bytes_data: 32,
    bytes_size: 16,
};

/// CPython 3.13 (no `_PyCFrame`; `_PyRuntime` starts with `_Py_DebugOffsets`, which
/// [`super::detect`] checks these against).
static PYTHON_3_13: PythonLayout = PythonLayout {
    minor: 13,
    runtime_interpreters_head: 632,
    interp_threads_head: 7344,
    tstate_next: 8,
    tstate_native_thread_id: 160,
    tstate_cframe: None,
    cframe_current_frame: 72,
    frame_previous: 8,
    frame_code: 0,
    frame_instr: 56,
    frame_owner: 70,
    frame_is_entry: None,
    owned_by_cstack: 3,
    code_adaptive: 200,
    code_qualname: 128,
    code_name: 120,
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    unicode_state: 32,
    unicode_length: 16,
    bytes_data: 32,
    bytes_size: 16,
};

/// The layout of CPython 3.`minor`; `None` for versions not supported (before 3.11, after
/// 3.13).
///
/// ```
/// let layout = router::python::layout(12).unwrap();
/// assert_eq!(layout.minor, 12);
/// assert!(router::python::layout(10).is_none());
/// ```
pub fn layout(minor: u32) -> Option<&'static PythonLayout> {
    match minor {
        11 => Some(&PYTHON_3_11),
        12 => Some(&PYTHON_3_12),
        13 => Some(&PYTHON_3_13),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for minor in 11..=13 {
            assert_eq!(layout(minor).unwrap().minor, minor);
        }
        for minor in [0, 6, 10, 14] {
            assert!(layout(minor).is_none());
        }
    }

    #[test]
    fn cframe_only_before_3_13_and_is_entry_only_in_3_11() {
        assert!(layout(11).unwrap().frame_is_entry.is_some());
        assert!(layout(12).unwrap().frame_is_entry.is_none());
        assert!(layout(12).unwrap().tstate_cframe.is_some());
        assert!(layout(13).unwrap().tstate_cframe.is_none());
    }
}
