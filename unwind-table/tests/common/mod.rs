//! Fixtures the tests compile (C with gcc, Rust with rustc) into a temporary directory, and
//! helpers to read ELF symbols.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use object::{Object, ObjectSymbol};

/// Debian's libc.
pub const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// The C fixture: a call chain, a qsort comparator, a frame too large for an `i16` CFA
/// offset, a frame realigned through rbp, and one realigned through a DRAP register
/// (`DW_OP_breg6; DW_OP_deref`). `fixture wait` blocks until stdin closes.
pub const C_SOURCE: &str = r#"
#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

volatile unsigned long sink;

__attribute__((noinline)) unsigned long spin(unsigned long n) {
    unsigned long acc = 0;
    for (unsigned long i = 0; i < n; i++) acc += i * i;
    sink = acc;
    return acc;
}

__attribute__((noinline)) unsigned long mid(unsigned long n) { return spin(n) + 1; }
__attribute__((noinline)) unsigned long outer(unsigned long n) { return mid(n) * 3; }

__attribute__((noinline)) int cmp_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

__attribute__((noinline)) int big_frame(int k) {
    char buf[100000];
    volatile char *p = buf;
    for (int i = 0; i < 100000; i += 4096) p[i] = (char)(i + k);
    spin(3);
    return p[k % 100000];
}

__attribute__((noinline)) int realigned(int k) {
    alignas(64) char v[64];
    volatile char *p = v;
    p[k & 63] = (char)k;
    spin(2);
    return p[(k + 1) & 63];
}

__attribute__((noinline)) int drap(int n) {
    alignas(64) char v[64];
    char vla[n];
    volatile char *p = v, *q = vla;
    p[n & 63] = (char)n;
    q[0] = 1;
    spin(2);
    return p[(n + 1) & 63] + q[0];
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "wait") == 0) {
        while (getchar() != EOF) {}
        return 0;
    }
    long xs[] = {5, 3, 9, 1, 7};
    qsort(xs, 5, sizeof xs[0], cmp_long);
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000;
    printf("%lu %d %d %d %ld\n", outer(n), big_frame(argc), realigned(argc), drap(argc + 8), xs[0]);
    return 0;
}
"#;

/// The Rust fixture: a chain of `#[inline(never)]` functions.
pub const RUST_SOURCE: &str = r#"
use std::hint::black_box;

#[inline(never)]
fn chain_leaf(n: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..black_box(n) {
        acc = acc.rotate_left(5) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    black_box(acc)
}

#[inline(never)]
fn chain_middle(n: u64) -> u64 {
    black_box(chain_leaf(n)).wrapping_add(1)
}

#[inline(never)]
fn chain_top(n: u64) -> u64 {
    black_box(chain_middle(n)).wrapping_mul(3)
}

fn main() {
    let n = std::env::args().count() as u64 * 1000;
    println!("{}", chain_top(black_box(n)));
}
"#;

/// The compiled fixtures.
pub struct Fixtures {
    _dir: tempfile::TempDir,
    /// C, `gcc -O2 -fomit-frame-pointer` (PIE).
    pub c_pie: PathBuf,
    /// C, the same with `-no-pie`.
    pub c_no_pie: PathBuf,
    /// C, `-g -fno-asynchronous-unwind-tables`: its own functions' CFI is in `.debug_frame`
    /// (the C runtime's stays in `.eh_frame`).
    pub c_debug_frame: PathBuf,
    /// Rust, `rustc -O`.
    pub rust: PathBuf,
}

/// The fixtures, compiled once per test binary.
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let c = dir.path().join("fixture.c");
        std::fs::write(&c, C_SOURCE).expect("write the C fixture");
        let rs = dir.path().join("fixture.rs");
        std::fs::write(&rs, RUST_SOURCE).expect("write the Rust fixture");
        let gcc = |out: &str, extra: &[&str]| {
            let path = dir.path().join(out);
            run(Command::new("gcc")
                .args(["-O2", "-fomit-frame-pointer"])
                .args(extra)
                .arg("-o")
                .arg(&path)
                .arg(&c));
            path
        };
        let c_pie = gcc("c-pie", &[]);
        let c_no_pie = gcc("c-no-pie", &["-no-pie"]);
        let c_debug_frame = gcc(
            "c-debug-frame",
            &[
                "-g",
                "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables",
            ],
        );
        let rust = dir.path().join("rust-fixture");
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        run(Command::new(rustc)
            .args(["-O", "--edition", "2021", "-o"])
            .arg(&rust)
            .arg(&rs));
        Fixtures {
            _dir: dir,
            c_pie,
            c_no_pie,
            c_debug_frame,
            rust,
        }
    })
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads a file the test needs.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The address range of the first symbol (symbol table, else dynamic symbols) whose name is
/// `name`, or contains it when `name` starts with `*`.
pub fn symbol(elf: &[u8], name: &str) -> Option<std::ops::Range<u64>> {
    let file = object::File::parse(elf).expect("an object file");
    let matches = |symbol_name: &str| match name.strip_prefix('*') {
        Some(part) => symbol_name.contains(part),
        None => symbol_name == name,
    };
    file.symbols()
        .chain(file.dynamic_symbols())
        .find(|symbol| symbol.name().is_ok_and(matches) && symbol.size() > 0)
        .map(|symbol| symbol.address()..symbol.address() + symbol.size())
}
