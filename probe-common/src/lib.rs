//! Types shared by the eBPF program (`probe-ebpf`) and its loader in the router.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side writes it into the ring buffer,
//! user space reads the same bytes back; user space writes unwind tables and process
//! mappings into maps, the kernel side reads them.
#![no_std]

pub mod python;
pub mod unwind;

/// Deepest stack the probe records, per part (user, kernel): the kernel's default
/// `perf_event_max_stack`. The one place this limit is defined.
pub const MAX_STACK_DEPTH: usize = 127;

/// Length of a task's command name.
pub const COMM_LEN: usize = 16;

/// The fixed part of a sample record. In the ring buffer it is followed by
/// `kernel_stack_bytes` of kernel return addresses and then `user_stack_bytes` of user ones
/// (u64 each, leaf first): a record is as long as its stacks, not as the deepest stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleHeader {
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub timestamp_ns: u64,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU the sample was taken on.
    pub cpu: u32,
    /// Bytes of user stack that follow the kernel stack; negative: the kernel's error.
    pub user_stack_bytes: i32,
    /// Bytes of kernel stack that follow the header; negative: the kernel's error.
    pub kernel_stack_bytes: i32,
    /// How the user stack was walked and why it ended: one of [`unwind::outcome`].
    pub unwind_outcome: u32,
    /// The thread's command name, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// Where the probe assembles a sample (a per-CPU scratch slot): the header, then room for
/// both stacks at full depth. Only the filled prefix goes into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleEvent {
    /// The fixed part.
    pub header: SampleHeader,
    /// The kernel stack, then the user stack right after it.
    pub frames: [u64; 2 * MAX_STACK_DEPTH],
}

/// Indices of the probe's per-CPU loss counters (map `LOSSES`).
pub mod loss {
    /// Samples dropped because the ring buffer was full.
    pub const RING_BUFFER_FULL: u32 = 0;
    /// User stacks that could not be read.
    pub const USER_STACK_UNREADABLE: u32 = 1;
    /// Kernel stacks that could not be read.
    pub const KERNEL_STACK_UNREADABLE: u32 = 2;
    /// Number of counters.
    pub const COUNT: u32 = 3;
}

#[cfg(feature = "user")]
// SAFETY: plain old data made of integers and arrays of integers, no padding holes.
unsafe impl aya::Pod for SampleHeader {}
