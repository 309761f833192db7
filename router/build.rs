//! Builds the eBPF program (`probe-ebpf`) with the nightly toolchain and bpf-linker, so that
//! the object is always compiled from source as part of the router's normal `cargo build`.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let probe_dir = manifest_dir.join("../probe-ebpf");
    let common_dir = manifest_dir.join("../probe-common");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target_dir = out_dir.join("probe-target");

    for path in [
        probe_dir.join("src"),
        probe_dir.join("Cargo.toml"),
        probe_dir.join("Cargo.lock"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .arg("--manifest-path")
        .arg(probe_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&probe_dir);
    // Nothing of the outer (stable, host) build may leak into the BPF build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP_TOOLCHAIN")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cargo.env_remove(key.as_ref());
        }
    }
    let status = cargo.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo` to build the eBPF program: {e}; run scripts/setup.sh")
    });
    if !status.success() {
        panic!(
            "building the eBPF program (probe-ebpf) failed; scripts/setup.sh installs what it needs \
             (nightly rust-src, bpf-linker)"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/probe");
    std::fs::copy(&object, out_dir.join("probe.bpf.o"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", object.display()));
}
