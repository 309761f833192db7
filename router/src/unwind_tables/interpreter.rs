//! What the probe needs to walk a process's CPython frames: where its runtime and its
//! interpreter loop are (found by [`crate::python::detect`]), its version's offsets, and
//! its pid namespace (the probe matches thread states by the thread ids the process sees).

use std::os::unix::fs::MetadataExt;

use probe_common::python::{PythonOffsets, PythonProcess, NO_OFFSET};

use crate::{process::MapEntry, python};

/// The probe's view of `pid`'s CPython interpreter; `None` when it runs none (or an
/// unsupported version).
pub fn python_of(pid: u32, maps: &[MapEntry]) -> Option<PythonProcess> {
    let found = python::detect(pid, maps)?;
    let namespace = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    let l = found.layout;
    Some(PythonProcess {
        runtime: found.runtime_address,
        eval_start: found.eval_start,
        eval_end: found.eval_end,
        pid_ns_dev: kernel_dev(namespace.dev()),
        pid_ns_ino: namespace.ino(),
        offsets: PythonOffsets {
            runtime_interpreters_head: l.runtime_interpreters_head,
            interp_threads_head: l.interp_threads_head,
            tstate_next: l.tstate_next,
            tstate_native_thread_id: l.tstate_native_thread_id,
            tstate_cframe: l.tstate_cframe.unwrap_or(NO_OFFSET),
            current_frame: l.cframe_current_frame,
            frame_previous: l.frame_previous,
            frame_code: l.frame_code,
            frame_instr: l.frame_instr,
            frame_owner: l.frame_owner,
            frame_is_entry: l.frame_is_entry.unwrap_or(NO_OFFSET),
            code_adaptive: l.code_adaptive,
            owned_by_cstack: l.owned_by_cstack,
            reserved: [0; 7],
        },
    })
}

/// A device number as the kernel compares it (`MKDEV`: major << 20 | minor), from the one
/// `stat` reports.
fn kernel_dev(dev: u64) -> u64 {
    (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev))
}
