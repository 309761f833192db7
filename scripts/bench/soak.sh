#!/usr/bin/env bash
# The soak test (issue 14; not run in CI): the release router at 999 Hz for 20 minutes under a
# fork storm and 1 000 distinct short-lived binaries, with perfdata, Datadog and OTLP consumers,
# the Datadog and OTLP backends (local peers) flapping down 60 s / up 60 s. Samples the router's
# RSS and /metrics every 10 s, then prints the table of docs/operations.md ("Soak test") with
# PASS/FAIL per check; exits 1 when a check fails. Run as root, after scripts/setup.sh --test:
#   scripts/bench/soak.sh [--minutes 20] [--no-build] [--out DIR] [more: soak/soak.py --help]
# --no-build uses the router and plugins already in target/release.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build=true
args=()
for arg in "$@"; do
  if [ "$arg" = "--no-build" ]; then build=false; else args+=("$arg"); fi
done
[ "$(id -u)" -eq 0 ] || { echo "soak: run as root (the eBPF producer needs it)" >&2; exit 1; }
if $build; then
  (cd "$repo" && cargo build --release --quiet -p router \
    -p consumer-perfdata -p consumer-datadog -p consumer-otlp)
fi
exec python3 "$repo/scripts/bench/soak/soak.py" "${args[@]}"
