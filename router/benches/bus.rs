//! The bus: batches per second from the producer side through the real plugin boundary
//! (a cdylib loaded by the plugin host) to 1 and to 3 consumers.
//!
//! One iteration publishes one realistic batch (10 000 samples, 2 000 stacks of depth 30)
//! and waits until every consumer has taken it.

use std::{hint::black_box, process::Command, sync::atomic::Ordering::Acquire, time::Duration};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use plugin_api::fixtures::{synthetic_batch, BatchShape};
use router::{bus::Bus, plugin_host::load_consumer};

fn test_consumer_path() -> std::path::PathBuf {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--release", "-p", "test-consumer"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build");
    assert!(status.success());
    let exe = std::env::current_exe().unwrap();
    let release = exe.parent().and_then(|deps| deps.parent()).unwrap();
    release.join("libtest_consumer.so")
}

fn bench_bus(c: &mut Criterion) {
    let plugin = test_consumer_path();
    let batch = synthetic_batch(BatchShape::BENCH, 1_700_000_000_000_000_000);
    let mut group = c.benchmark_group("bus_publish_deliver");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for consumers in [1usize, 3] {
        let loaded = (0..consumers)
            .map(|i| (load_consumer(&format!("c{i}"), &plugin, "").unwrap(), 100))
            .collect();
        let bus = Bus::start(loaded, Duration::from_secs(5));
        let stats = bus.stats();
        let mut published = 0u64;
        group.bench_function(format!("{consumers}_consumers"), |b| {
            b.iter_batched(
                || batch.clone(),
                |batch| {
                    bus.publish(black_box(batch));
                    published += 1;
                    for (_, s) in &stats {
                        while s.delivered.load(Acquire) < published {
                            std::hint::spin_loop();
                        }
                    }
                },
                BatchSize::LargeInput,
            )
        });
        bus.shutdown(Duration::from_secs(5));
    }
    group.finish();
}

criterion_group!(benches, bench_bus);
criterion_main!(benches);
