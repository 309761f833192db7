//! The probe's maps and the settings the loader writes before the program runs.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use probe_common::{
    loss,
    python::PythonProcess,
    unwind::{outcome, ExecMapping, ProcessMappings, UnwindRow},
    SampleEvent, MAX_STACK_DEPTH,
};

/// 1 when `TARGET_PIDS` restricts sampling to the processes it lists.
#[no_mangle]
pub static FILTER_BY_PID: u8 = 0;
/// 1 to keep samples of the idle task (pid 0).
#[no_mangle]
pub static INCLUDE_IDLE: u8 = 0;
/// 1 to record kernel stacks.
#[no_mangle]
pub static INCLUDE_KERNEL: u8 = 1;
/// 1 to unwind user stacks with the CFI rows of `UNWIND_ROWS` (else frame pointers only).
#[no_mangle]
pub static UNWIND_WITH_CFI: u8 = 0;
/// Frames of each stack to record: `max_stack_depth` (at most `MAX_STACK_DEPTH`).
#[no_mangle]
pub static FRAMES_WANTED: u32 = MAX_STACK_DEPTH as u32;

/// Samples on their way to user space. The loader sizes it to the host (see
/// `ring_buffer_bytes` in the router); this is the fallback.
#[map]
pub static SAMPLES: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// The processes to sample when `FILTER_BY_PID` is set.
#[map]
pub static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// Processes whose first sample has woken the reader (least recently sampled ones are
/// forgotten first; a forgotten or reused pid waits for the next periodic drain at most).
#[map]
pub static SEEN_PIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Where each CPU assembles its sample before copying the filled part into `SAMPLES`.
#[map]
pub static SCRATCH: PerCpuArray<SampleEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU loss counters, indexed by `probe_common::loss`.
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

/// Per-CPU count of samples by how their user stack was walked (`probe_common::unwind::outcome`).
#[map]
pub static OUTCOMES: PerCpuArray<u64> = PerCpuArray::with_max_entries(outcome::COUNT, 0);

/// Every unwind table, one sorted run of rows per executable file (the router allocates the
/// runs and sizes the array to its budget). Memory-mappable, so the router writes tables
/// with plain stores instead of a syscall per row.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Every process's executable mappings, one sorted run per process (the router allocates
/// the runs, like the tables' rows, and writes them through a memory mapping).
#[map]
pub static MAPPINGS: Array<ExecMapping> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Where each process's run of `MAPPINGS` is, written once its tables are loaded.
#[map]
pub static PROCESS_MAPPINGS: HashMap<u32, ProcessMappings> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// The CPython processes, by pid (written by the router when it finds the interpreter).
#[map]
pub static PYTHON_PROCESSES: HashMap<u32, PythonProcess> =
    HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Each Python thread's thread state (`PyThreadState *`), by thread id, found once and
/// checked at every use.
#[map]
pub static PYTHON_THREADS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Where each CPU keeps its unwinder's registers between tail calls.
#[map]
pub static UNWIND_STATE: PerCpuArray<crate::unwinding::UnwindState> =
    PerCpuArray::with_max_entries(1, 0);

/// The unwinder program, at index [`UNWINDER`], which tail-calls itself per batch of frames,
/// and the Python walker, at [`PYTHON_WALKER`], which the unwinder calls at the interpreter
/// loop and which calls the unwinder back.
#[map]
pub static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Index of the unwinder program in `PROGRAMS`.
pub const UNWINDER: u32 = 0;
/// Index of the Python walker in `PROGRAMS`.
pub const PYTHON_WALKER: u32 = 1;

/// `BPF_F_MMAPABLE`: the array can be mapped into the router's memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// A global that the loader sets before the program runs.
pub fn setting<T: Copy>(global: &T) -> T {
    // SAFETY: a read of a global that the loader sets before the program runs.
    unsafe { core::ptr::read_volatile(global) }
}

/// Adds one to a per-CPU counter.
pub fn count(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}
