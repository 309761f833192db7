#!/usr/bin/env bash
# What the DWARF unwinder's tables cost on this host: the release router runs at 999 Hz for
# SECONDS (default 60) while every ELF executable in /usr/bin and /usr/sbin is started once
# (`--version`, a second at most) and a few long-running interpreters work, so that the tables
# of most of the host's binaries get built. Prints the tables loaded, their rows and the
# unwinder's kernel memory (from /metrics), the time spent building them, and the router's
# peak RSS. Run as root: [UNWINDER=frame-pointer] scripts/bench/unwind_tables.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
cargo build --release --workspace --quiet
tmp="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
port=19464
cat > "$tmp/agent.toml" <<TOML
[producer]
frequency_hz = 999
unwinder = "${UNWINDER:-dwarf}"
interval = "10s"
[consumers.perfdata]
path = "$tmp/profiles"
[telemetry]
listen = "127.0.0.1:$port"
TOML
target/release/router --config "$tmp/agent.toml" 2> "$tmp/router.log" &
router=$!
sleep 2
# Long-running interpreters, and every executable started once.
python3 -c 'import time, hashlib
end = time.time() + 1e9
while True: hashlib.sha256(b"x" * 100000).digest()' &
perl -e 'while (1) { $x .= "a"; $x = "" if length($x) > 1e6 }' &
for bin in /usr/bin/* /usr/sbin/*; do
  [ -x "$bin" ] && head -c 4 "$bin" 2>/dev/null | grep -q ELF || continue
  timeout 1 "$bin" --version < /dev/null > /dev/null 2>&1 || true
done
remaining=$((seconds - SECONDS))
[ "$remaining" -gt 0 ] && sleep "$remaining"
metrics="$(curl -s "http://127.0.0.1:$port/metrics")"
metric() { echo "$metrics" | awk -v n="$1" '$1 == n { print $2 }'; }
hwm_kb="$(awk '/VmHWM/ { print $2 }' /proc/$router/status)"
echo "unwind tables after ${SECONDS}s (router at 999 Hz, every ELF in /usr/bin and /usr/sbin started once):"
echo "  processes known to the unwinder now: $(metric router_unwind_processes)"
echo "  tables loaded:                       $(metric router_unwind_tables_loaded)"
echo "  rows in use:                         $(metric router_unwind_table_rows) of $(metric router_unwind_table_rows_capacity)"
echo "  table bytes in use:                  $(( $(metric router_unwind_table_rows) * 8 / 1024 )) KiB"
echo "  unwinder map memory (kernel):        $(( $(metric router_unwind_map_bytes) / 1024 / 1024 )) MiB"
echo "  build time, all tables:              $(( $(metric router_unwind_table_build_microseconds_total) / 1000 )) ms"
echo "  tables failed / evicted:             $(metric router_unwind_table_failures_total) / $(metric router_unwind_table_evictions_total)"
echo "  router peak RSS:                     $((hwm_kb / 1024)) MB"
echo "  user stacks by outcome:"
echo "$metrics" | grep '^router_user_stacks_total' | sed 's/^/    /'
kill -INT "$router"; wait "$router" 2>/dev/null || true
