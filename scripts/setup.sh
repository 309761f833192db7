#!/usr/bin/env bash
# Idempotent machine setup for building and testing the profile router.
#   scripts/setup.sh          toolchains (nightly rust-src, bpf-linker) for the eBPF build
#   scripts/setup.sh --test   also the independent test peers (apt + pip packages)
# Safe to run twice; quiet when there is nothing to do.
set -euo pipefail

want_test_peers=false
[ "${1:-}" = "--test" ] && want_test_peers=true

say() { echo "setup: $*"; }
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/profile-router"

# 1. The nightly toolchain with rust-src (the eBPF program is built with -Z build-std=core).
if ! rustup +nightly component list --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to the nightly toolchain"
  rustup component add rust-src --toolchain nightly
fi

# 2. bpf-linker, linked against the nightly toolchain's own libLLVM. The prefix folder holds
#    links to that library under both names: libLLVM.so (for the build) and its soname (for
#    the loader, through the rpath baked into bpf-linker).
sysroot="$(rustc +nightly --print sysroot)"
llvm_lib="$(ls "$sysroot"/lib/libLLVM.so.*-rust-* 2>/dev/null | head -n1)"
[ -n "$llvm_lib" ] || { echo "setup: no libLLVM in $sysroot/lib" >&2; exit 1; }
llvm_major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
prefix="$cache_dir/llvm-$llvm_major"
mkdir -p "$prefix/lib"
ln -sfn "$llvm_lib" "$prefix/lib/libLLVM.so"
ln -sfn "$llvm_lib" "$prefix/lib/$(basename "$llvm_lib")"
if ! bpf-linker --version >/dev/null 2>&1; then
  say "building bpf-linker 0.13 against $llvm_lib (llvm-$llvm_major); this takes a few minutes"
  LLVM_PREFIX="$prefix" RUSTFLAGS="-C link-arg=-Wl,-rpath,$prefix/lib" \
    cargo +nightly install --quiet --locked --force bpf-linker --version 0.13.0 \
      --no-default-features --features "llvm-$llvm_major"
fi

# 3. Test peers: perf (perf.data), go (go tool pprof), chromium (flame graph SVG),
#    python packages (Datadog test agent, OTLP receiver, Prometheus parser, Kubernetes schemas).
if $want_test_peers; then
  apt_pkgs=()
  command -v perf >/dev/null 2>&1 || apt_pkgs+=(linux-perf)
  command -v go >/dev/null 2>&1 || apt_pkgs+=(golang-go)
  command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
  command -v gcc >/dev/null 2>&1 || apt_pkgs+=(gcc)
  command -v setpriv >/dev/null 2>&1 || apt_pkgs+=(util-linux)
  command -v systemd-analyze >/dev/null 2>&1 || apt_pkgs+=(systemd)
  command -v openssl >/dev/null 2>&1 || apt_pkgs+=(openssl)
  # libc's separate debug file: the symbolizer names libc's own functions from it.
  dpkg -s libc6-dbg >/dev/null 2>&1 || apt_pkgs+=(libc6-dbg)
  # libfuse2: the hostile FUSE file system of the security tests (with Python's fusepy).
  dpkg -s libfuse2 >/dev/null 2>&1 || apt_pkgs+=(libfuse2)
  if [ ${#apt_pkgs[@]} -gt 0 ]; then
    say "installing ${apt_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
  fi
  # Python peers: Datadog's test agent, the OTLP receiver's packages, a Prometheus parser.
  py_missing=()
  python3 -c 'import ddapm_test_agent.agent' >/dev/null 2>&1 || py_missing+=(ddapm-test-agent)
  python3 -c 'import prometheus_client' >/dev/null 2>&1 || py_missing+=(prometheus-client)
  python3 -c 'import kubernetes_validate' >/dev/null 2>&1 || py_missing+=(kubernetes-validate)
  python3 -c 'import fuse' >/dev/null 2>&1 || py_missing+=(fusepy)
  if [ ${#py_missing[@]} -gt 0 ]; then
    say "installing Python packages ${py_missing[*]}"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${py_missing[@]}"
  fi
  # The OTLP receiver needs proto v1.10 (opentelemetry-proto 1.45+), which the test agent's
  # pin (<1.37) excludes: it gets a virtual environment of its own.
  otlp_venv="$cache_dir/otlp-peer"
  if ! "$otlp_venv/bin/python" -c 'from opentelemetry.proto.profiles.v1development import profiles_pb2 as p; p.ProfilesDictionary.DESCRIPTOR.fields_by_name["stack_table"]; import grpc' >/dev/null 2>&1; then
    say "creating the OTLP receiver's Python environment in $otlp_venv"
    python3 -m venv "$otlp_venv"
    "$otlp_venv/bin/python" -m pip install --quiet --disable-pip-version-check 'opentelemetry-proto>=1.45' grpcio
  fi
fi
