//! OTLP conversion + encoding of the realistic batch (10 000 samples, 2 000 stacks of depth 30):
//! time per batch, and encoded size printed once.

use std::{collections::BTreeMap, hint::black_box};

use consumer_otlp::{config::GroupBy, convert::RequestBuilder};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plugin_api::fixtures::{synthetic_batch, BatchShape};
use prost::Message;

fn encode(batch: &plugin_api::ProfileBatch) -> Vec<u8> {
    let mut b = RequestBuilder::new(GroupBy::Process, &BTreeMap::new());
    b.add_batch(batch);
    b.finish().encode_to_vec()
}

fn bench(c: &mut Criterion) {
    let batch = synthetic_batch(BatchShape::BENCH, 1_700_000_000_000_000_000);
    let bytes = encode(&batch);
    let gzipped = {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        gz.finish().unwrap()
    };
    println!(
        "OTLP request for {} samples: {} bytes encoded, {} bytes gzip",
        batch.samples.len(),
        bytes.len(),
        gzipped.len()
    );
    let mut group = c.benchmark_group("otlp");
    group.throughput(Throughput::Elements(batch.samples.len() as u64));
    group.bench_function("convert_encode_10k_samples", |b| {
        b.iter(|| black_box(encode(black_box(&batch))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
