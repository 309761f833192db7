//! A Rust release workload (`rustc -O`) with a known call chain:
//! main -> outer -> middle -> leaf_spin. Usage: chains-rs [seconds] (default: forever).
use std::hint::black_box;
use std::time::{Duration, Instant};

#[inline(never)]
fn leaf_spin(n: u64) -> u64 {
    let mut sum = 0u64;
    for i in 0..n {
        sum = sum.wrapping_add(black_box(i).wrapping_mul(i));
    }
    sum
}

#[inline(never)]
fn middle(n: u64) -> u64 {
    black_box(leaf_spin(n)) ^ n
}

#[inline(never)]
fn outer(until: Option<Instant>) -> u64 {
    let mut total = 0u64;
    while until.is_none_or(|t| Instant::now() < t) {
        total = total.wrapping_add(black_box(middle(black_box(2_000_000))));
    }
    total
}

fn main() {
    let seconds: Option<f64> = std::env::args().nth(1).and_then(|s| s.parse().ok());
    let until = seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    black_box(outer(until));
}
