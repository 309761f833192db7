//! Peak heap of the consumer over a fork storm: tens of thousands of distinct deep stacks of
//! short-lived processes, about 1.5 KB of folded text each, written with its flame graph. A
//! counting allocator tracks the peak of live bytes; the bound fails when writing a profile
//! holds its parts at once again (the perf.data copied whole, the folded text built twice, the
//! SVG in memory beside them).
//!
//! Under heaptrack, for where the peak is:
//! `heaptrack target/release/deps/write_peak_memory-* --nocapture`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use consumer_perfdata::PerfDataConsumer;
use plugin_api::{BatchBuilder, ConsumerPlugin, FrameKind, Process, ProfileBatch, Sample};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Samples per batch, each of its own process and stack.
const SAMPLES_PER_BATCH: u32 = 6_000;
/// Batches of one profile (10 s each).
const BATCHES: u32 = 3;
/// Kernel frames at the leaf end of every stack, drawn from `KERNEL_NAMES` names.
const KERNEL_DEPTH: u32 = 24;
const KERNEL_NAMES: u64 = 600;

/// Batch `index` of the storm: every sample a new process (`job-N` names, a few dozen) in a
/// distinct stack of 8 user frames and 24 kernel ones with long names.
fn fork_storm_batch(index: u32) -> ProfileBatch {
    let mut b = BatchBuilder::new();
    b.cpu_sample_types();
    let user: Vec<u32> = (0..8u64)
        .map(|i| {
            let name = format!("user_space_function_on_the_exec_path_number_{i}");
            b.frame_symbolized(0x40_1000 + i * 0x100, None, &name, FrameKind::Native)
        })
        .collect();
    let start_ns = 1_790_000_000_000_000_000 + u64::from(index) * 10_000_000_000;
    let mut random = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(index);
    for s in 0..SAMPLES_PER_BATCH {
        let mut frames = Vec::with_capacity(32);
        for _ in 0..KERNEL_DEPTH {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            let k = random % KERNEL_NAMES;
            let name = format!("kernel_function_of_fork_exec_and_exit_paths_{k:03}");
            let address = 0xffff_ffff_8100_0000 + k * 64;
            frames.push(b.frame_symbolized(address, None, &name, FrameKind::Kernel));
        }
        frames.extend(user.iter().rev());
        let stack = b.stack(&frames);
        let pid = 10_000 + index * SAMPLES_PER_BATCH + s;
        let comm = b.intern(&format!("job-{}", pid % 40));
        b.process(Process {
            pid,
            comm,
            ..Default::default()
        });
        b.sample(Sample {
            pid,
            tid: pid,
            cpu: s % 2,
            stack,
            values: vec![1, 1_001_001].into(),
            timestamp_ns: start_ns + u64::from(s) * 1_000_000,
            thread_name: comm,
        });
    }
    let h = b.header();
    (h.start_ns, h.end_ns, h.period_ns) = (start_ns, start_ns + 10_000_000_000, 1_001_001);
    h.frequency_hz = 999;
    b.finish()
}

#[test]
fn writing_a_fork_storm_profile_keeps_the_heap_peak_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "path = \"{}\"\nrotate_interval = \"60s\"\nrotate_size = \"64MiB\"",
        dir.path().display()
    );
    let mut consumer = PerfDataConsumer::from_toml(&toml).unwrap();
    for index in 0..BATCHES {
        consumer.consume(&fork_storm_batch(index)).unwrap();
    }
    let before_write = LIVE.load(Ordering::Relaxed);
    PEAK.store(before_write, Ordering::Relaxed);
    consumer.flush(Duration::from_secs(1)).unwrap();
    let write_peak = PEAK.load(Ordering::Relaxed);

    let size = |ext: &str| {
        let entry = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.file_name().to_string_lossy().ends_with(ext))
            .unwrap_or_else(|| panic!("a .{ext} file"));
        entry.metadata().unwrap().len() as usize
    };
    let (data, folded, svg) = (size(".data"), size(".folded"), size(".svg"));
    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    println!(
        "open profile {:.1} MiB, write peak {:.1} MiB (perf.data {:.1} MiB, folded {:.1} MiB, \
         svg {:.1} MiB)",
        mib(before_write),
        mib(write_peak),
        mib(data),
        mib(folded),
        mib(svg),
    );
    assert!(
        folded > 20 << 20,
        "a storm of distinct stacks: {folded} bytes"
    );
    // The records wait on disk beyond their first MiB: the open profile (its folded stacks,
    // its bookkeeping and at most a MiB of records) is smaller than its perf.data; it held
    // the records and the rest (11.5 MiB here) before.
    assert!(
        before_write < data,
        "{before_write} bytes held for a perf.data of {data} bytes"
    );
    // The folded text and inferno's frames parsed from it (about as large) are all a write
    // holds; before, the perf.data records and their copy, and the text twice, were beside
    // them (103 MiB here, against 56 MiB).
    assert!(
        write_peak < 2 * folded + data,
        "{write_peak} bytes at peak, for {folded} bytes of folded text"
    );
}
