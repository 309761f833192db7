//! How long `build` takes on real binaries: libc, libpython3.11, and the router itself
//! (when it has been built). Files that are absent are skipped.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

const FILES: [(&str, &str); 4] = [
    ("libc", "/lib/x86_64-linux-gnu/libc.so.6"),
    (
        "libpython3.11",
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
    ),
    ("router (debug)", "target/debug/router"),
    ("router (release)", "target/release/router"),
];

/// The files present, with their bytes. Relative paths are from the workspace root.
fn inputs() -> Vec<(&'static str, String, Vec<u8>)> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    FILES
        .iter()
        .filter_map(|(name, path)| {
            let path = workspace.join(path);
            match std::fs::read(&path) {
                Ok(bytes) => Some((*name, path.display().to_string(), bytes)),
                Err(err) => {
                    eprintln!("{name}: skipped ({}: {err})", path.display());
                    None
                }
            }
        })
        .collect()
}

fn bench_build(c: &mut Criterion) {
    let inputs = inputs();
    for (name, path, bytes) in &inputs {
        let start = std::time::Instant::now();
        match unwind_table::build(&bytes[..]) {
            Ok(table) => eprintln!(
                "{name} ({path}, {} KiB): {} rows, {} table bytes ({:.1} KiB), {} unsupported \
                 rows, {} FDEs, {} skipped FDEs; one build {:.1} ms",
                bytes.len() / 1024,
                table.rows.len(),
                table.rows.len() * 8,
                (table.rows.len() * 8) as f64 / 1024.0,
                table.stats.unsupported_rows,
                table.stats.fdes,
                table.stats.skipped_fdes,
                start.elapsed().as_secs_f64() * 1e3,
            ),
            Err(err) => eprintln!("{name} ({path}): {err}"),
        }
    }
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for (name, _, bytes) in &inputs {
        group.bench_function(*name, |b| {
            b.iter(|| unwind_table::build(black_box(&bytes[..])))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_build);
criterion_main!(benches);
