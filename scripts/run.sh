#!/usr/bin/env bash
# Sets up this machine (idempotently), builds the router and its plugins, and runs the agent.
# With no arguments it uses its built-in default: profile this host with eBPF and write
# perf.data files, folded stacks and flame graphs under ./profiles (of the current folder).
# Arguments go to the router instead (e.g. --config examples/agent.toml). Stop it with Ctrl-C:
# it writes what it collected before it exits.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

"$repo/scripts/setup.sh"
(cd "$repo" && cargo build --release --workspace --quiet)
if [ $# -eq 0 ]; then
  set -- --profiling-perfdata-path ./profiles
fi
exec "$repo/target/release/router" "$@"
