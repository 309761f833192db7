#!/usr/bin/env bash
# Sets up this machine (idempotently), builds the router and its plugins, and runs the agent.
# With no arguments it uses its built-in default: profile this host with eBPF and write
# perf.data files, folded stacks and flame graphs under ./profiles. Extra arguments go to the
# router (e.g. --config examples/agent.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --workspace --quiet
if [ $# -eq 0 ]; then
  set -- --profiling-perfdata-path ./profiles
fi
exec target/release/router "$@"
