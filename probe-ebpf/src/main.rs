//! The CPU sampling probe: a perf_event program run on every CPU at the sampling frequency.
//! Each run records pid, tid, cpu, comm, a timestamp and the user and kernel stacks into a
//! ring buffer, as long a record as its stacks need, and counts in the kernel what it could
//! not record.
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
use probe_common::{loss, SampleEvent, SampleHeader, MAX_STACK_DEPTH};

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

/// Where each CPU assembles its sample before copying the filled part into `SAMPLES`.
#[map]
static SCRATCH: PerCpuArray<SampleEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU loss counters, indexed by `probe_common::loss`.
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;
const HEADER_BYTES: u32 = core::mem::size_of::<SampleHeader>() as u32;

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
    let Some(event) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `event` is this CPU's scratch slot, used by this program run alone (perf_event
    // programs do not nest on a CPU). The header is written in full; the stacks are written
    // by the kernel helper, and only the bytes it reports are sent.
    let record_bytes = unsafe {
        let header = &mut (*event).header;
        header.timestamp_ns = bpf_ktime_get_ns();
        header.pid = pid;
        header.tid = tid;
        header.cpu = bpf_get_smp_processor_id();
        header.reserved = 0;
        header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        let frames = (*event).frames.as_mut_ptr().cast::<u8>();
        let user = aya_ebpf::helpers::generated::bpf_get_stack(
            ctx.as_ptr(),
            frames.cast(),
            stack_bytes(),
            BPF_F_USER_STACK as u64,
        );
        header.user_stack_bytes = user as i32;
        if user < 0 && pid != 0 {
            count_loss(loss::USER_STACK_UNREADABLE);
        }
        let user_bytes = filled(user);
        let kernel = if flag(&INCLUDE_KERNEL) {
            // The kernel stack goes right after the user stack.
            let bytes = aya_ebpf::helpers::generated::bpf_get_stack(
                ctx.as_ptr(),
                frames.add(user_bytes as usize).cast(),
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
        header.kernel_stack_bytes = kernel as i32;
        HEADER_BYTES + user_bytes + filled(kernel)
    };
    // SAFETY: the first `record_bytes` bytes of the scratch slot, at most its whole size.
    let record = unsafe { core::slice::from_raw_parts(event.cast::<u8>(), record_bytes as usize) };
    if SAMPLES.output::<[u8]>(record, wakeup(pid)).is_err() {
        count_loss(loss::RING_BUFFER_FULL);
    }
    0
}

/// Bytes a stack helper filled, from its result: none on an error, never more than asked.
fn filled(result: i64) -> u32 {
    if result <= 0 {
        0
    } else {
        (result as u32).min(STACK_BYTES)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
