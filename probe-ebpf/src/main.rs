//! The CPU sampling probe: a perf_event program run on every CPU at the sampling frequency.
//! Each run records pid, tid, cpu, comm, a timestamp and the user and kernel stacks into a
//! ring buffer, and counts in the kernel what it could not record.
//!
//! Waking user space costs more than the rest of a sample (an inter-processor interrupt, a
//! hypervisor exit in a VM, a context switch), so a sample wakes the reader only when it must:
//! for a process not seen before (its mappings are read before it can exit) or when the buffer
//! fills up. Everything else waits for the reader's periodic drain.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RB_RING_SIZE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::{map, perf_event},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
    EbpfContext,
};
use probe_common::{loss, SampleEvent, MAX_STACK_DEPTH};

/// 1 when `TARGET_PIDS` restricts sampling to the processes it lists.
#[no_mangle]
static FILTER_BY_PID: u8 = 0;
/// 1 to keep samples of the idle task (pid 0).
#[no_mangle]
static INCLUDE_IDLE: u8 = 0;
/// 1 to record kernel stacks.
#[no_mangle]
static INCLUDE_KERNEL: u8 = 1;
/// Bytes of each stack to record: `max_stack_depth` frames of 8 bytes (at most the buffer's).
#[no_mangle]
static STACK_BYTES_WANTED: u32 = STACK_BYTES;

/// Samples on their way to user space. The loader sizes it to the host (one second of
/// samples from every CPU, see `ring_buffer_bytes` in the router); this is the fallback.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// The processes to sample when `FILTER_BY_PID` is set.
#[map]
static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// Processes whose first sample has woken the reader (least recently sampled ones are
/// forgotten first; a forgotten or reused pid waits for the next periodic drain at most).
#[map]
static SEEN_PIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU loss counters, indexed by `probe_common::loss`.
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;

/// How many bytes of a stack to ask the kernel for; it walks no deeper than that.
fn stack_bytes() -> u32 {
    // SAFETY: a read of a global that the loader sets before the program runs.
    let wanted = unsafe { core::ptr::read_volatile(&STACK_BYTES_WANTED) };
    wanted.min(STACK_BYTES)
}

fn flag(global: &u8) -> bool {
    // SAFETY: a read of a global that the loader sets before the program runs.
    unsafe { core::ptr::read_volatile(global) != 0 }
}

fn count_loss(index: u32) {
    if let Some(counter) = LOSSES.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
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

#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if pid == 0 && !flag(&INCLUDE_IDLE) {
        return 0;
    }
    // SAFETY: lookup of a plain u32 key.
    if flag(&FILTER_BY_PID) && unsafe { TARGET_PIDS.get(&pid) }.is_none() {
        return 0;
    }
    let Some(mut entry) = SAMPLES.reserve::<SampleEvent>(0) else {
        count_loss(loss::RING_BUFFER_FULL);
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring buffer memory of the right size; every field
    // is written before submit (the stacks by the kernel helper, up to the bytes it reports).
    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).pid = pid;
        (*event).tid = tid;
        (*event).cpu = bpf_get_smp_processor_id();
        (*event).reserved = 0;
        (*event).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        let user = aya_ebpf::helpers::generated::bpf_get_stack(
            ctx.as_ptr(),
            (*event).user_stack.as_mut_ptr().cast(),
            stack_bytes(),
            BPF_F_USER_STACK as u64,
        );
        (*event).user_stack_bytes = user as i32;
        if user < 0 && pid != 0 {
            count_loss(loss::USER_STACK_UNREADABLE);
        }
        let kernel = if flag(&INCLUDE_KERNEL) {
            let bytes = aya_ebpf::helpers::generated::bpf_get_stack(
                ctx.as_ptr(),
                (*event).kernel_stack.as_mut_ptr().cast(),
                stack_bytes(),
                0,
            );
            if bytes < 0 {
                count_loss(loss::KERNEL_STACK_UNREADABLE);
            }
            bytes
        } else {
            0
        };
        (*event).kernel_stack_bytes = kernel as i32;
    }
    entry.submit(wakeup(pid));
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
