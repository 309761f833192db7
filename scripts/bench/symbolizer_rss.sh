#!/usr/bin/env bash
# What many distinct short-lived binaries cost the symbolizer: the release router samples at
# 999 Hz (2 s intervals) while BINARIES (default 600) distinct binaries run, two at a time,
# each spinning 0.3 s in a function of its own name (one C program compiled once, copied with
# a distinct function name and build id each, all named `spinner`, the only command the
# router profiles, so that the rest of the host does not blur the numbers). Prints the router's RSS before and after, and
# the symbolizer's cache size from /metrics.
# Run as root: [ROUTER=path/to/router] scripts/bench/symbolizer_rss.sh [BINARIES]
set -euo pipefail
cd "$(dirname "$0")/../.."
binaries="${1:-600}"
router_bin="${ROUTER:-target/release/router}"
[ -n "${ROUTER:-}" ] || cargo build --release -p router -p consumer-perfdata --quiet
tmp="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
port=19465

cat > "$tmp/spin.c" <<'C'
#include <time.h>
__attribute__((noinline)) void distinct_fn_000000(void) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do clock_gettime(CLOCK_MONOTONIC, &now);
    while ((now.tv_sec - start.tv_sec) * 1000000000L + now.tv_nsec - start.tv_nsec < 300000000L);
}
int main(void) { distinct_fn_000000(); return 0; }
C
gcc -O1 -Wl,--build-id=0x5eed000000000000000000000000000000000000 -o "$tmp/template" "$tmp/spin.c"
python3 - "$tmp" "$binaries" <<'PY'
import os, sys
tmp, count = sys.argv[1], int(sys.argv[2])
template = open(f"{tmp}/template", "rb").read()
marker_id = bytes.fromhex("5eed" + "00" * 18)
for i in range(count):
    data = template.replace(b"distinct_fn_000000", f"distinct_fn_{i:06}".encode())
    data = data.replace(marker_id, bytes.fromhex(f"5eed{i:036x}"))
    os.mkdir(f"{tmp}/b{i}")
    path = f"{tmp}/b{i}/spinner"
    open(path, "wb").write(data)
    os.chmod(path, 0o755)
PY

cat > "$tmp/agent.toml" <<TOML
[producer]
frequency_hz = 999
interval = "2s"
comms = ["spinner"]
[consumers.perfdata]
path = "$tmp/profiles"
[telemetry]
listen = "127.0.0.1:$port"
TOML
"$router_bin" --config "$tmp/agent.toml" 2> "$tmp/router.log" &
router=$!
sleep 5
rss_mb() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$router/status"; }
before="$(rss_mb)"
for ((i = 0; i < binaries; i += 2)); do
  pids=()
  for j in "$i" "$((i + 1))"; do
    [ "$j" -lt "$binaries" ] && { "$tmp/b$j/spinner" & pids+=($!); }
  done
  wait "${pids[@]}"
done
sleep 5
after="$(rss_mb)"
metrics="$(curl -s "http://127.0.0.1:$port/metrics")"
metric() { echo "$metrics" | awk -v n="$1" '$1 == n { print $2 }'; }
echo "symbolizer after $binaries distinct short-lived binaries (router at 999 Hz, 2 s intervals):"
echo "  router RSS before / after:     $before MB / $after MB (peak $(awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' /proc/$router/status) MB)"
echo "  answers cached:                $(metric router_symbol_cache_entries)"
echo "  their estimated bytes:         $(metric router_symbol_cache_bytes)"
echo "  answers evicted:               $(metric router_symbol_cache_evictions_total)"
echo "  ELF files held open:           $(metric router_symbol_files_open)"
echo "  cache hits / misses:           $(metric router_symbol_cache_hits_total) / $(metric router_symbol_cache_misses_total)"
echo "  for comparison, unwind tables:  $(metric router_unwind_tables_loaded) ($(metric router_unwind_table_rows) rows)"
echo "  perf.data records waiting:     $(metric 'router_plugin_open_profile_bytes{consumer="perfdata"}') bytes"
kill -INT "$router"; wait "$router" 2>/dev/null || true
