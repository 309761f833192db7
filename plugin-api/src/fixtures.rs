//! Synthetic batches for the tests and benchmarks of the router and of plugins.

use crate::{BatchBuilder, FrameKind, Mapping, Process, ProfileBatch, Sample};

/// The shape of a synthetic batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchShape {
    /// Number of samples.
    pub samples: usize,
    /// Number of distinct stacks.
    pub unique_stacks: usize,
    /// Frames per stack (the last one is `main`, the leaf-most one kernel when `kernel_frames`).
    pub depth: usize,
    /// Number of processes the samples are spread over.
    pub processes: u32,
    /// Kernel frames at the leaf end of every stack.
    pub kernel_frames: usize,
}

impl BatchShape {
    /// The realistic batch of the benchmarks: 10 000 samples, 2 000 stacks of depth 30.
    pub const BENCH: BatchShape = BatchShape {
        samples: 10_000,
        unique_stacks: 2_000,
        depth: 30,
        processes: 20,
        kernel_frames: 5,
    };
}

/// Function name of frame `level` of stack `stack` in a synthetic batch.
pub fn function_name(stack: usize, level: usize, depth: usize) -> String {
    match level {
        l if l + 1 == depth => "main".to_owned(),
        l => format!("fn_{}_{}", l, stack % (l + 2)),
    }
}

/// A deterministic batch of the given shape, starting at `start_ns`, sampled at 99 Hz.
///
/// Stacks share their root-side frames the way real programs do, so frames repeat across
/// stacks; the kernel frames sit at the leaf end.
pub fn synthetic_batch(shape: BatchShape, start_ns: u64) -> ProfileBatch {
    let mut b = BatchBuilder::new();
    let frequency_hz = 99;
    let period_ns = 1_000_000_000 / frequency_hz;
    let duration_ns = 10_000_000_000u64;
    let host = crate::HostInfo {
        hostname: b.intern("synthetic-host"),
        kernel_release: b.intern("6.1.0-synthetic"),
        os_release: b.intern("Debian GNU/Linux 12 (bookworm)"),
        arch: b.intern("x86_64"),
        cpu_count: 2,
    };
    let event = b.intern("cpu-clock");
    b.cpu_sample_types();
    let kernel_path = b.intern("[kernel.kallsyms]");
    let kernel = b.mapping(Mapping {
        pid: 0,
        start: 0xffff_ffff_8100_0000,
        end: 0xffff_ffff_8300_0000,
        path: kernel_path,
        kernel: true,
        ..Default::default()
    });
    let mut process_mappings = Vec::new();
    for p in 0..shape.processes {
        let pid = 1000 + p;
        let exe = b.intern(&format!("/usr/bin/app{p}"));
        let build_id = b.intern(&format!("{:040x}", 0xabc0_0000u64 + u64::from(p)));
        let comm = b.intern(&format!("app{p}"));
        process_mappings.push(b.mapping(Mapping {
            pid,
            start: 0x40_0000,
            end: 0x80_0000,
            file_offset: 0x1000,
            path: exe,
            build_id,
            kernel: false,
        }));
        b.process(Process {
            pid,
            comm,
            exe,
            container_id: 0,
            ..Default::default()
        });
    }
    let mut stacks = Vec::with_capacity(shape.unique_stacks);
    for s in 0..shape.unique_stacks {
        let p = s % shape.processes as usize;
        let frames: Vec<u32> = (0..shape.depth)
            .map(|level| {
                if level < shape.kernel_frames {
                    let address = 0xffff_ffff_8100_0000 + (s * 7 + level) as u64 * 64;
                    let name = format!("kfunc_{}", (s + level) % 50);
                    b.frame_symbolized(address, Some(kernel), &name, FrameKind::Kernel)
                } else {
                    let name = function_name(s, level, shape.depth);
                    let address = 0x40_1000 + (level as u64) * 0x100 + (s % (level + 2)) as u64;
                    b.frame_symbolized(address, Some(process_mappings[p]), &name, FrameKind::Native)
                }
            })
            .collect();
        stacks.push((p as u32, b.stack(&frames)));
    }
    for i in 0..shape.samples {
        let (p, stack) = stacks[i % stacks.len()];
        let pid = 1000 + p;
        let thread_name = b.intern(&format!("app{p}"));
        b.sample(Sample {
            pid,
            tid: pid + (i % 3) as u32,
            cpu: (i % 2) as u32,
            stack,
            values: vec![1, period_ns as i64].into(),
            timestamp_ns: start_ns + (i as u64 * duration_ns) / shape.samples.max(1) as u64,
            thread_name,
        });
    }
    let header = b.header();
    header.start_ns = start_ns;
    header.end_ns = start_ns + duration_ns;
    header.period_ns = period_ns;
    header.frequency_hz = frequency_hz;
    header.event = event;
    header.host = host;
    b.finish()
}
