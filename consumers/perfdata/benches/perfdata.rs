//! perf.data write throughput for the realistic batch (10 000 samples, 2 000 stacks of depth
//! 30): samples per second, and bytes per sample printed once.

use std::hint::black_box;

use consumer_perfdata::{folded::FoldedStacks, perf_file::PerfDataFile};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plugin_api::fixtures::{synthetic_batch, BatchShape};

fn bench_write(c: &mut Criterion) {
    let batch = synthetic_batch(BatchShape::BENCH, 1_700_000_000_000_000_000);
    let mut file = PerfDataFile::new("router");
    file.add_batch(&batch);
    let bytes = file.finish();
    println!(
        "perf.data for {} samples: {} bytes, {:.1} bytes/sample",
        batch.samples.len(),
        bytes.len(),
        bytes.len() as f64 / batch.samples.len() as f64
    );

    let mut group = c.benchmark_group("perfdata");
    group.throughput(Throughput::Elements(batch.samples.len() as u64));
    group.bench_function("encode_10k_samples", |b| {
        b.iter(|| {
            let mut file = PerfDataFile::new("router");
            file.add_batch(black_box(&batch));
            black_box(file.finish())
        })
    });
    group.bench_function("fold_and_render_svg_10k_samples", |b| {
        b.iter(|| {
            let mut folded = FoldedStacks::default();
            folded.add_batch(black_box(&batch));
            let mut svg = Vec::new();
            folded.into_text().write_svg("bench", &mut svg).unwrap();
            black_box(svg)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_write);
criterion_main!(benches);
