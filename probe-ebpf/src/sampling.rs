//! The entry program: one run per sample on the CPU it interrupted. It records the header
//! and the kernel stack, then either hands the user stack to the CFI unwinder (a tail call)
//! or walks it with frame pointers, and sends the record to user space.
//!
//! Waking user space costs more than the rest of a sample (an inter-processor interrupt, a
//! hypervisor exit in a VM, a context switch), so a sample wakes the reader only when it must:
//! for a process not seen before (its mappings are read before it can exit) or when the buffer
//! fills up. Everything else waits for the reader's periodic drain.

use aya_ebpf::{
    bindings::{
        BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RB_RING_SIZE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_get_stack,
    },
    macros::perf_event,
    programs::PerfEventContext,
    EbpfContext,
};
use probe_common::{loss, unwind::outcome, SampleEvent, SampleHeader, MAX_STACK_DEPTH};

use crate::{maps::*, unwinding};

/// Bytes of one stack at full depth.
pub const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;
const HEADER_BYTES: u32 = core::mem::size_of::<SampleHeader>() as u32;

#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if pid == 0 && setting(&INCLUDE_IDLE) == 0 {
        return 0;
    }
    // SAFETY: lookup of a plain u32 key.
    if setting(&FILTER_BY_PID) != 0 && unsafe { TARGET_PIDS.get(&pid) }.is_none() {
        return 0;
    }
    let Some(event) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `event` is this CPU's scratch slot, used by this program run (and the tail
    // calls it makes) alone: perf_event programs do not nest on a CPU. The header is written
    // in full; the stacks are written by the kernel helper or the unwinder, and only the
    // bytes they report are sent.
    unsafe {
        let header = &mut (*event).header;
        header.timestamp_ns = bpf_ktime_get_ns();
        header.pid = pid;
        header.tid = tid;
        header.cpu = bpf_get_smp_processor_id();
        header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        header.user_stack_bytes = 0;
        header.unwind_outcome = outcome::FRAME_POINTERS;
        let frames = (*event).frames.as_mut_ptr().cast::<u8>();
        let kernel = if setting(&INCLUDE_KERNEL) != 0 {
            let bytes = bpf_get_stack(ctx.as_ptr(), frames.cast(), stack_bytes(), 0);
            if bytes < 0 {
                count(&LOSSES, loss::KERNEL_STACK_UNREADABLE);
            }
            bytes
        } else {
            0
        };
        header.kernel_stack_bytes = kernel as i32;
        let kernel_bytes = filled(kernel);

        if pid != 0 && setting(&UNWIND_WITH_CFI) != 0 {
            if let Some(process) = PROCESS_MAPPINGS.get_ptr(pid) {
                let python = PYTHON_PROCESSES.get_ptr(pid).map(|p| &*p);
                if unwinding::begin(&ctx, *process, python, kernel_bytes / 8) {
                    PROGRAMS.tail_call(&ctx, UNWINDER);
                }
                // The tail call failed (no program loaded): frame pointers instead.
            } else {
                header.unwind_outcome = outcome::NO_TABLE_YET;
            }
        }
        // The user stack goes right after the kernel stack.
        let user = bpf_get_stack(
            ctx.as_ptr(),
            frames.add(kernel_bytes as usize).cast(),
            stack_bytes(),
            BPF_F_USER_STACK as u64,
        );
        if user < 0 && pid != 0 {
            count(&LOSSES, loss::USER_STACK_UNREADABLE);
        }
        (*event).header.user_stack_bytes = user as i32;
        submit(event);
    }
    0
}

/// Sends the filled part of `event` to user space and counts how its user stack ended.
///
/// # Safety
/// `event` is this CPU's scratch slot.
pub unsafe fn submit(event: *mut SampleEvent) {
    // SAFETY: the caller's slot, read only.
    let header = unsafe { &(*event).header };
    let record_bytes = HEADER_BYTES
        + filled(i64::from(header.kernel_stack_bytes))
        + filled(i64::from(header.user_stack_bytes));
    count(&OUTCOMES, header.unwind_outcome);
    let pid = header.pid;
    // SAFETY: the first `record_bytes` bytes of the scratch slot, at most its whole size.
    let record = unsafe { core::slice::from_raw_parts(event.cast::<u8>(), record_bytes as usize) };
    if SAMPLES.output::<[u8]>(record, wakeup(pid)).is_err() {
        count(&LOSSES, loss::RING_BUFFER_FULL);
    }
}

/// How many bytes of a stack to ask the kernel for; it walks no deeper than that.
fn stack_bytes() -> u32 {
    setting(&FRAMES_WANTED).min(MAX_STACK_DEPTH as u32) * 8
}

/// Bytes a stack helper filled, from its result: none on an error, never more than a stack.
pub fn filled(result: i64) -> u32 {
    if result <= 0 {
        0
    } else {
        (result as u32).min(STACK_BYTES)
    }
}

/// The submit flag: wake the reader for a new process or a buffer a quarter full, else not.
fn wakeup(pid: u32) -> u64 {
    if pid != 0 && SEEN_PIDS.get_ptr(pid).is_none() {
        // A full map evicts its oldest entry, so this insert cannot fail for want of room.
        let _ = SEEN_PIDS.insert(pid, 1, 0);
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    if SAMPLES.query(BPF_RB_AVAIL_DATA as u64) * 4 >= SAMPLES.query(BPF_RB_RING_SIZE as u64) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
