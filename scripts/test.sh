#!/usr/bin/env bash
# Sets up this machine (idempotently) and runs every test of the workspace: unit tests,
# integration tests against the real router binary and real plugins, the eBPF tests (as root),
# and the tests that read our output back with independent tools.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --test
cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast 2>&1
