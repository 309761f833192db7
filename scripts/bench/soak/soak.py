#!/usr/bin/env python3
"""The soak test (run it through scripts/bench/soak.sh, as root): the release router samples
this host with eBPF for --minutes at --frequency Hz while

- a fork storm starts --storm-rate short-lived processes a second (/bin/true; every tenth spins
  a few milliseconds),
- --binaries distinct executables (one small C program, copied with distinct build ids) run
  one after the other, 20 ms each, over and over,
- three consumers take every batch: perfdata (a local folder), Datadog and OTLP (gRPC), the
  last two against local peers (peers.py) that flap: up --flap-seconds, killed (SIGKILL) for
  --flap-seconds, restarted on the same port, and so on; after the soak the peers stay up
  until the consumers' queues are empty, then the router is stopped (SIGINT) and flushes.

Every 10 s it samples the router's RSS (/proc/PID/status VmRSS) and /metrics. At the end it
prints (and writes to OUT/report.md) the table described in docs/operations.md, "Soak test",
and exits 1 when a check fails. OUT keeps the router's log, the peers' request logs, the
perf.data files and series.csv (one row per 10 s sample).
"""
import argparse, csv, hashlib, json, os, re, shutil, signal, socket, subprocess, sys, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
SAMPLE_EVERY = 10.0
RSS_LIMIT_MB = 60.0
# "Flat" is no growth: the least-squares slope of the last half's RSS. Its range is shown but not
# judged: the consumers' own rhythms (the Datadog minute, the perf.data file) make a sawtooth.
SLOPE_LIMIT_MB_PER_10MIN = 2.0
CONSUMERS = ["perfdata", "datadog", "otlp"]
FLAPPING = ["datadog", "otlp"]
# Each consumer's own drop counters: {name in /metrics (router_plugin_NAME_total): name in the
# plugin's "flushed: ..." line at exit, which includes what its final flush dropped}.
PLUGIN_DROPS = {"perfdata": {"files_dropped": None},
                "datadog": {"dropped_profiles": "dropped", "rejected_profiles": "rejected"},
                "otlp": {"dropped_requests": "dropped", "rejected_requests": "rejected"}}
PLUGIN_QUEUE = {"datadog": "queued_profiles", "otlp": "queued_requests"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_python():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ["HOME"], ".cache")
    python = os.path.join(cache, "profile-router/otlp-peer/bin/python")
    if not os.access(python, os.X_OK):
        sys.exit(f"soak: no {python}: run scripts/setup.sh --test first")
    return python


class FlappingPeer:
    """A backend (peers.py) on a fixed port, started and killed on demand; remembers the
    windows during which it was up."""

    def __init__(self, kind, port, out):
        self.kind, self.port = kind, port
        self.log = os.path.join(out, f"{kind}-requests.jsonl")
        self.proc, self.windows = None, []

    @property
    def up(self):
        return self.proc is not None

    def start(self):
        deadline = time.monotonic() + 30
        while True:
            proc = subprocess.Popen([peer_python(), os.path.join(HERE, "peers.py"), self.kind,
                                     "--port", str(self.port), "--log", self.log],
                                    stdout=subprocess.PIPE, text=True)
            if proc.stdout.readline().strip() == "ready":
                self.proc = proc
                self.windows.append([time.time(), None])
                return
            proc.wait()
            if time.monotonic() > deadline:  # the port stays taken
                sys.exit(f"soak: the {self.kind} peer does not start on port {self.port}")
            time.sleep(1)

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.windows[-1][1] = time.time()

    def requests(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f]


class Workload:
    """The fork storm and the distinct binaries, until stop()."""

    def __init__(self, out, binaries, storm_rate):
        bin_dir = os.path.join(out, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        self.base = os.path.join(bin_dir, "soak-workload")
        subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-Wl,--build-id=sha1", "-o", self.base,
                        os.path.join(HERE, "workload.c")], check=True)
        self.copies = distinct_copies(self.base, bin_dir, binaries)
        self.storm_rate, self.runs, self.stopping = storm_rate, 0, threading.Event()

    def start(self):
        self.storm = self.storm_rate and subprocess.Popen(
            [self.base, "storm", str(self.storm_rate), "10", "3"], start_new_session=True)
        self.runner = threading.Thread(target=self.run_copies, daemon=True)
        self.runner.start()

    def run_copies(self):
        while self.copies and not self.stopping.is_set():
            for copy in self.copies:
                if self.stopping.is_set():
                    return
                subprocess.run([copy, "spin", "20"], check=True)
                self.runs += 1

    def stop(self):
        self.stopping.set()
        if self.storm:
            os.killpg(self.storm.pid, signal.SIGKILL)
            self.storm.wait()
        self.runner.join()


def distinct_copies(base, folder, count):
    """`count` copies of `base`, each with its own build id (the GNU build-id note rewritten)."""
    notes = subprocess.run(["readelf", "-n", base], capture_output=True, text=True, check=True).stdout
    build_id = bytes.fromhex(re.search(r"Build ID: ([0-9a-f]+)", notes).group(1))
    image = open(base, "rb").read()
    assert image.count(build_id) == 1, "the build id must occur once in the binary"
    copies = []
    for n in range(count):
        path = os.path.join(folder, f"soak-bin-{n:04}")
        with open(path, "wb") as f:
            f.write(image.replace(build_id, hashlib.sha1(f"soak-{n}".encode()).digest()[:len(build_id)]))
        os.chmod(path, 0o755)
        copies.append(path)
    return copies


def scrape(port):
    """/metrics as {(name, value of its label, e.g. the consumer or the cause, or ""): value}."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    metrics = {}
    for line in text.splitlines():
        m = re.match(r'^([a-z_]+)(?:\{(.*)\})? ([0-9.e+-]+)$', line)
        if m:
            label = re.search(r'="([^"]*)"', m.group(2) or "")
            metrics[(m.group(1), label.group(1) if label else "")] = float(m.group(3))
    return metrics


def status_mb(pid, field):
    """A memory field of /proc/PID/status (VmRSS, VmHWM), in MB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Router:
    def __init__(self, router, out, args, ports):
        self.config = os.path.join(out, "agent.toml")
        self.log = os.path.join(out, "router.log")
        self.metrics_port = ports["metrics"]
        with open(self.config, "w") as f:
            f.write(f"""log_level = "info,router::producer::ebpf=debug"
log_format = "json"
shutdown_timeout = "60s"

[producer]
frequency_hz = {args.frequency}
interval = "10s"

[telemetry]
listen = "127.0.0.1:{ports['metrics']}"

[consumers.perfdata]
path = "{out}/profiles"
retention_count = 1000
retention_bytes = "16GiB"

[consumers.datadog]
agent_url = "http://127.0.0.1:{ports['datadog']}/profiling/v1/input"

[consumers.otlp]
endpoint = "http://127.0.0.1:{ports['otlp']}"
""")
        self.proc = subprocess.Popen([router, "--config", self.config], stderr=open(self.log, "w"))
        deadline = time.monotonic() + 60
        while not any(line.get("fields", {}).get("message") == "router started" for line in self.lines()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"soak: the router did not start; see {self.log}")
            time.sleep(0.5)

    def lines(self):
        lines = []
        for line in open(self.log, errors="replace"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        return lines

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=120)


def soak(args, out):
    ports = {"metrics": free_port(), "datadog": free_port(), "otlp": free_port()}
    print(f"soak: building the workload and {args.binaries} distinct binaries in {out}/bin", flush=True)
    workload = Workload(out, args.binaries, args.storm_rate)
    peers = {kind: FlappingPeer(kind, ports[kind], out) for kind in FLAPPING}
    router = None
    series = []
    try:
        for peer in peers.values():
            peer.start()
        router = Router(args.router, out, args, ports)
        workload.start()
        start, end = time.time(), time.time() + args.minutes * 60
        print(f"soak: running {args.minutes} min at {args.frequency} Hz (router pid {router.proc.pid})", flush=True)
        next_sample = start

        def sample(phase):
            try:
                metrics = scrape(router.metrics_port)
            except OSError as e:  # counted as a missing scrape; the RSS is still sampled
                print(f"  /metrics did not answer: {e}", flush=True)
                metrics = {}
            series.append({"t": time.time() - start, "phase": phase, "rss_mb": status_mb(router.proc.pid, "VmRSS"),
                           "metrics": metrics})

        while time.time() < end:
            up = int((time.time() - start) // args.flap_seconds) % 2 == 0
            for peer in peers.values():
                if peer.up != up:
                    peer.kill() if peer.up else peer.start()
            if time.time() >= next_sample:
                sample("soak")
                s = series[-1]
                print(f"  t={s['t']:5.0f}s rss={s['rss_mb']:5.1f} MB backends {'up' if up else 'down'}", flush=True)
                next_sample += SAMPLE_EVERY
            time.sleep(0.2)
        workload.stop()
        for peer in peers.values():
            if not peer.up:
                peer.start()
        # The backends stay up until every queue is empty (bounded), then the router flushes.
        drain_end = time.time() + args.drain_seconds
        while True:
            sample("drain")
            m = series[-1]["metrics"]
            queued = sum(m.get(("router_consumer_queue_depth", c), 0) for c in CONSUMERS) + \
                sum(m.get((f"router_plugin_{g}", c), 0) for c, g in PLUGIN_QUEUE.items())
            if (m and queued == 0) or time.time() > drain_end:
                break
            time.sleep(SAMPLE_EVERY)
        peak = status_mb(router.proc.pid, "VmHWM")
        exit_code = router.stop()
        router_lines = router.lines()
    finally:
        for peer in peers.values():
            if peer.up:
                peer.kill()
        if router and router.proc.poll() is None:
            router.proc.kill()
        if not workload.stopping.is_set() and hasattr(workload, "storm"):
            workload.stop()
    write_series(out, series)
    return report(args, out, series, peak, exit_code, router_lines, peers, workload.runs)


def write_series(out, series):
    columns = [("router_samples_collected_total", ""), ("router_samples_lost_total", "ring_buffer_full")]
    with open(os.path.join(out, "series.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "phase", "rss_mb", "samples_collected", "samples_lost"] +
                   [f"{c}_{k}" for c in CONSUMERS for k in ("delivered", "dropped", "failed", "queued")])
        for s in series:
            m = s["metrics"]
            row = [f"{s['t']:.0f}", s["phase"], f"{s['rss_mb']:.1f}"] + [int(m.get(c, 0)) for c in columns]
            for c in CONSUMERS:
                row += [int(m.get((f"router_consumer_batches_{k}_total", c), 0)) for k in ("delivered", "dropped")]
                row += [int(m.get(("router_consumer_calls_failed_total", c), 0)),
                        int(m.get(("router_consumer_queue_depth", c), 0))]
            w.writerow(row)


def up_windows(counts):
    """Requests per up-window; the first, before any outage, in parentheses."""
    return ", ".join([f"({counts[0]})"] + [str(n) for n in counts[1:]])


def slope_per_10min(points):
    """Least-squares slope of (seconds, MB) points, in MB per 10 minutes."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 600 * sum((t - mt) * (r - mr) for t, r in points) / var if var else 0.0


def perf_script_samples(folder):
    """Sample records in every perf.data of `folder`, as `perf script` reads them."""
    total = 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".data"):
            out = subprocess.run(["perf", "script", "-F", "pid", "-i", os.path.join(folder, name)],
                                 capture_output=True, text=True, check=True).stdout
            total += sum(1 for line in out.splitlines() if line.strip())
    return total


def report(args, out, series, peak, exit_code, lines, peers, binary_runs):
    message = lambda line: line.get("fields", {}).get("message", "")
    intervals = [line["fields"] for line in lines if message(line) == "interval collected"]
    published = sum(int(i["samples"]) for i in intervals)
    final = next((s["metrics"] for s in reversed(series) if s["metrics"]), {})
    missed_scrapes = sum(1 for s in series if not s["metrics"])
    stopped = {}
    for line in lines:
        m = re.match(r"consumer stopped: received=(\d+) delivered=(\d+) dropped=(\d+) failed=(\d+)", message(line))
        if m:
            stopped[line["fields"].get("consumer", "")] = [int(v) for v in m.groups()]
    flushed = {}
    for line in lines:
        if message(line).startswith("flushed: "):
            flushed[line["fields"].get("consumer", "")] = {
                k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", message(line))}
    warnings = [line for line in lines if line.get("level") in ("WARN", "ERROR")]

    soak_points = [(s["t"], s["rss_mb"]) for s in series if s["phase"] == "soak"]
    half = args.minutes * 60 / 2
    last_half = [r for t, r in soak_points if t >= half] or [soak_points[-1][1]]
    rss_max = max(s["rss_mb"] for s in series)
    flat = max(last_half) - min(last_half)
    slope = slope_per_10min([(t, r) for t, r in soak_points if t >= half])

    arrived = {"perfdata": perf_script_samples(os.path.join(out, "profiles"))}
    duplicates, per_window = {}, {}
    for kind, peer in peers.items():
        requests = peer.requests()
        unique = {r["digest"]: r for r in requests}
        arrived[kind] = sum(r["samples"] for r in unique.values())
        duplicates[kind] = len(requests) - len(unique)
        per_window[kind] = [sum(1 for r in requests if w0 <= r["time"] <= w1) for w0, w1 in peer.windows]

    rows, loss_ok, counted_drops = [], True, {}
    for c in CONSUMERS:
        received, delivered, dropped, failed = stopped.get(c, [0, 0, 0, 0])
        plugin_drops = {
            metric: flushed[c][key] if key and c in flushed else int(final.get((f"router_plugin_{metric}_total", c), 0))
            for metric, key in PLUGIN_DROPS[c].items()}
        counted = dropped + failed + sum(plugin_drops.values())
        missing = published - arrived[c]
        balanced = received == len(intervals) and received == delivered + dropped + failed
        ok = balanced and (missing == 0 or (missing > 0 and counted > 0))
        loss_ok &= ok
        windows = per_window.get(c)
        counted_drops[c] = counted
        rows.append([c, f"{received} / {delivered} / {dropped} / {failed}",
                     ", ".join(f"{k} {v}" for k, v in plugin_drops.items()),
                     f"{arrived[c]}" + (f" ({duplicates[c]} duplicate requests)" if duplicates.get(c) else ""),
                     f"{missing}", up_windows(windows) if windows else "n/a (not flapping)",
                     ("yes" if all(n > 0 for n in windows[1:]) else "NO") if windows else "n/a"])
    after_outage = all(all(n > 0 for n in w[1:]) for w in per_window.values())

    checks = [
        (f"RSS < {RSS_LIMIT_MB:.0f} MB in every 10 s sample", rss_max < RSS_LIMIT_MB, f"max {rss_max:.1f} MB"),
        (f"RSS flat over the last half (least-squares slope < {SLOPE_LIMIT_MB_PER_10MIN:.0f} MB / 10 min)",
         slope < SLOPE_LIMIT_MB_PER_10MIN, f"slope {slope:+.1f} MB / 10 min, range {flat:.1f} MB"),
        ("every flapping backend received data after each outage", after_outage,
         "; ".join(f"{k}: {up_windows(w)}" for k, w in per_window.items())),
        ("no loss beyond counted drops (published = arrived + counted drops)", loss_ok,
         "; ".join(f"{r[0]}: {r[4]} missing, {counted_drops[r[0]]} counted drops" for r in rows)),
        ("router exited cleanly", exit_code == 0, f"exit code {exit_code}"),
    ]
    lost_ring = int(final.get(("router_samples_lost_total", "ring_buffer_full"), 0))
    text = [
        f"Soak: {args.minutes:g} min at {args.frequency} Hz, backends (datadog, otlp) down "
        f"{args.flap_seconds} s / up {args.flap_seconds} s, fork storm {args.storm_rate}/s, "
        f"{args.binaries} distinct binaries ({binary_runs} runs of 20 ms); router "
        f"{args.router} built {time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(args.router)))}",
        "",
        "| RSS (MB) | start | max | last-half min | last-half max | last-half slope (MB / 10 min) | peak (VmHWM) |",
        "|---|---|---|---|---|---|---|",
        f"| router | {soak_points[0][1]:.1f} | {rss_max:.1f} | {min(last_half):.1f} | {max(last_half):.1f} "
        f"| {slope:+.1f} | {peak:.1f} |",
        "",
        f"Samples published: {published} in {len(intervals)} batches; lost whole (ring buffer full, "
        f"counted): {lost_ring}; user stacks left out (process exited): "
        f"{int(final.get(('router_stacks_lost_total', 'process_exited'), 0))}; "
        f"WARN/ERROR log lines: {len(warnings)}; /metrics scrapes that failed: {missed_scrapes} of {len(series)}",
        "",
        "| consumer | batches received / delivered / dropped / failed | plugin's counted drops "
        "| samples that arrived | missing | requests per up-window (first: before any outage) | data after each outage |",
        "|---|---|---|---|---|---|---|",
    ] + ["| " + " | ".join(r) + " |" for r in rows] + [
        "",
        "| check | result | |",
        "|---|---|---|",
    ] + [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks]
    report_text = "\n".join(text) + "\n"
    print(report_text)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_text)
    return all(ok for _, ok, _ in checks)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--frequency", type=int, default=999, help="samples per second per CPU")
    parser.add_argument("--flap-seconds", type=float, default=60, help="backends up this long, then down as long")
    parser.add_argument("--binaries", type=int, default=1000, help="distinct short-lived executables (0: none)")
    parser.add_argument("--storm-rate", type=int, default=300, help="processes started per second by the fork storm (0: none)")
    parser.add_argument("--drain-seconds", type=float, default=240, help="longest wait for the queues to empty at the end")
    parser.add_argument("--router", default=os.path.join(REPO, "target/release/router"))
    parser.add_argument("--out", help="folder for logs, profiles and the report (default: a new one in /var/tmp)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak: run as root (the eBPF producer needs it)")
    for tool in ("gcc", "readelf", "perf", "zstd"):
        if not shutil.which(tool):
            sys.exit(f"soak: {tool} is missing (scripts/setup.sh --test installs the peers)")
    out = args.out or time.strftime("/var/tmp/soak-%Y%m%d-%H%M%S")
    os.makedirs(out, exist_ok=True)
    sys.exit(0 if soak(args, os.path.abspath(out)) else 1)


if __name__ == "__main__":
    main()
