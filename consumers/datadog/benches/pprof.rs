//! Conversion + compression of the realistic batch (10 000 samples, 2 000 stacks of depth 30)
//! into a compressed pprof, side by side with Datadog's own Rust profiling library
//! (`libdd-profiling`: its `Profile` builder and compressed serialization), same labels,
//! same samples. Prints both encoded sizes once.

use std::{hint::black_box, num::NonZeroI64, time::Duration};

use consumer_datadog::{compress, config::Compression, pprof::PprofBuilder};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use libdd_profiling::{api, internal::Profile};
use plugin_api::{
    fixtures::{synthetic_batch, BatchShape},
    ProfileBatch,
};

fn ours(batch: &ProfileBatch) -> Vec<u8> {
    let mut b = PprofBuilder::new();
    b.add_batch(batch);
    compress(b, Compression::Zstd).unwrap()
}

fn libdd(batch: &ProfileBatch) -> Vec<u8> {
    let sample_types = [
        api::ValueType::new("cpu-samples", "count"),
        api::ValueType::new("cpu-time", "nanoseconds"),
    ];
    let period = api::Period {
        r#type: sample_types[1],
        value: batch.period_ns as i64,
    };
    let mut profile = Profile::try_new(&sample_types, Some(period)).unwrap();
    for s in batch.samples.iter() {
        let locations = batch
            .stack(s.stack)
            .map(|f| {
                let m = f
                    .mapping
                    .as_ref()
                    .into_option()
                    .map(|&m| &batch.mappings[m as usize]);
                api::Location {
                    mapping: api::Mapping {
                        memory_start: m.map_or(0, |m| m.start),
                        memory_limit: m.map_or(0, |m| m.end),
                        file_offset: m.map_or(0, |m| m.file_offset),
                        filename: m.map_or("", |m| batch.str(m.path)),
                        build_id: m.map_or("", |m| batch.str(m.build_id)),
                    },
                    function: api::Function {
                        name: batch.str(f.function),
                        system_name: batch.str(f.function),
                        filename: batch.str(f.file),
                    },
                    address: f.address,
                    line: i64::from(f.line),
                }
            })
            .collect();
        let process = batch.process(s.pid);
        let values = [s.values[0], s.values[1]];
        let labels = vec![
            api::Label {
                key: "process_id",
                num: i64::from(s.pid),
                ..Default::default()
            },
            api::Label {
                key: "thread id",
                num: i64::from(s.tid),
                ..Default::default()
            },
            api::Label {
                key: "thread name",
                str: batch.str(s.thread_name),
                ..Default::default()
            },
            api::Label {
                key: "process name",
                str: process.map_or("", |p| batch.str(p.comm)),
                ..Default::default()
            },
            api::Label {
                key: "cpu",
                num: i64::from(s.cpu),
                ..Default::default()
            },
        ];
        let sample = api::Sample {
            locations,
            values: &values,
            labels,
        };
        profile
            .try_add_sample(sample, NonZeroI64::new(s.timestamp_ns as i64))
            .unwrap();
    }
    let end = std::time::UNIX_EPOCH + Duration::from_nanos(batch.end_ns);
    profile
        .serialize_into_compressed_pprof(
            Some(end),
            Some(Duration::from_nanos(batch.end_ns - batch.start_ns)),
        )
        .unwrap()
        .buffer
}

fn bench(c: &mut Criterion) {
    let batch = synthetic_batch(BatchShape::BENCH, 1_700_000_000_000_000_000);
    let mut raw = PprofBuilder::new();
    raw.add_batch(&batch);
    println!(
        "uncompressed pprof of {} samples: {} bytes",
        batch.samples.len(),
        raw.encode().len()
    );
    let (a, b) = (ours(&batch), libdd(&batch));
    println!(
        "compressed pprof of {} samples: ours {} bytes, libdd-profiling {} bytes ({:.2}x)",
        batch.samples.len(),
        a.len(),
        b.len(),
        a.len() as f64 / b.len() as f64
    );
    let mut group = c.benchmark_group("pprof_convert_compress");
    group.throughput(Throughput::Elements(batch.samples.len() as u64));
    group.bench_function("ours", |bench| {
        bench.iter(|| black_box(ours(black_box(&batch))))
    });
    group.bench_function("libdd_profiling", |bench| {
        bench.iter(|| black_box(libdd(black_box(&batch))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
