#!/usr/bin/env python3
"""Overhead of the agent, measured side by side in one run.

1. Throughput of a CPU-bound workload (one thread per CPU, running throughout) in short windows,
   alternating: no profiler, the router (eBPF at 99 Hz, perfdata consumer + a counting
   consumer), and `perf record -F 99 -a -g`. Each profiler is started before its window and
   stopped after it; each profiler window is compared with the profiler-free windows on either
   side, which cancels the host's drift, and the result is the mean of those comparisons with
   a 95 % confidence interval. The host's throughput wanders by about 2 % between any two
   windows whatever their length, so precision comes from many short windows.
2. The router's own CPU time and peak RSS over a longer run (perfdata, Datadog and OTLP
   consumers loaded, their backends absent so they queue and retry), next to perf record's:
   this covers the work done once per interval (symbolization, consumers), which the short
   windows of 1. leave out.
3. Bytes per sample of our perf.data files next to perf record's, same workload, same time.
4. The eBPF program's own run time per sample (kernel.bpf_stats_enabled, /proc/PID/fdinfo),
   with each unwinder (frame pointers, DWARF), side by side.

The workload is built without frame pointers (-O2 -fomit-frame-pointer) and works 30 calls
deep, so the unwinders walk stacks like a service's. The router runs with `--unwinder`
(default dwarf, the router's default). With `--workload python`, the workload is Debian's
python3.11 running a chain of ten Python functions (scripts/bench/workload.py), one process per
CPU, and 4. compares the probe with and without its Python walk (`python_frames`).

Usage (root): scripts/bench/overhead.py [--windows 150] [--perf-every 3] [--seconds 1]
                                        [--agent-seconds 60] [--unwinder dwarf|frame-pointer]
                                        [--workload c|python]
              scripts/bench/overhead.py --probe-cost-only [--workload c|python]
"""
import argparse, mmap, os, signal, statistics, struct, subprocess, sys, tempfile, threading, time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTER = os.path.join(REPO, "target/release/router")
# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
T975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14,
        2.13, 2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05,
        2.05, 2.04]


def build(tmp, workload):
    """The router, and the workload's command (it takes the counter file's path)."""
    subprocess.run(["cargo", "build", "--release", "--workspace", "--quiet"], cwd=REPO, check=True)
    if workload == "python":
        return ["/usr/bin/python3.11", os.path.join(REPO, "scripts/bench/workload.py")]
    binary = os.path.join(tmp, "workload")
    subprocess.run(["cc", "-O2", "-fomit-frame-pointer", "-pthread", "-o", binary,
                    os.path.join(REPO, "scripts/bench/workload.c")], check=True)
    return [binary]


class Workload:
    """The workload, one spinning thread (or process) per CPU; `units()` reads its counters
    while it runs."""

    def __init__(self, command, tmp):
        path = os.path.join(tmp, "counters")
        self.proc = subprocess.Popen(command + [path], start_new_session=True)
        while not os.path.exists(path) or os.path.getsize(path) < 64 * os.cpu_count():
            time.sleep(0.01)
        with open(path, "r+b") as f:
            self.counters = mmap.mmap(f.fileno(), 64 * os.cpu_count())

    def units(self):
        return sum(struct.unpack_from("<Q", self.counters, 64 * i)[0] for i in range(os.cpu_count()))

    def rate(self, seconds):
        """Units per second over the next `seconds`."""
        u0, t0 = self.units(), time.monotonic()
        time.sleep(seconds)
        return (self.units() - u0) / (time.monotonic() - t0)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def overheads(sequence):
    """Per profiler: 1 - (its window's rate / mean of the two profiler-free windows around it)."""
    result = {}
    for i in range(1, len(sequence) - 1):
        name, rate = sequence[i]
        if name != "none":
            assert sequence[i - 1][0] == sequence[i + 1][0] == "none"
            base = (sequence[i - 1][1] + sequence[i + 1][1]) / 2
            result.setdefault(name, []).append(100 * (1 - rate / base))
    return result


def confidence(values):
    """Mean and the half-width of its 95 % confidence interval."""
    half = 0.0
    if len(values) > 1:
        t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
        half = t * statistics.stdev(values) / len(values) ** 0.5
    return statistics.mean(values), half


def alternate(workload, tmp, windows, perf_every, seconds, settle=0.3):
    """`windows` router windows and one perf record window per `perf_every` of them, each
    between two profiler-free windows; a profiler starts before its window and stops after."""
    order = []
    for i in range(windows):
        order += ["none", "router"] + (["none", "perf record"] if i % perf_every == perf_every - 1 else [])
    sequence = []
    for n, name in enumerate(order + ["none"]):
        helper = {"none": lambda: None, "router": lambda: start_router(tmp),
                  "perf record": lambda: start_perf(tmp)}[name]()
        time.sleep(settle)
        sequence.append((name, workload.rate(seconds)))
        if helper:
            stop(helper)
        if n % 50 == 49:
            print(f"  ... {n + 1} of {len(order) + 1} windows", flush=True)
    return overheads(sequence)


UNWINDER = "dwarf"
# The probe variants whose run time per sample 4. compares, per workload: (label, producer keys).
PROBE_VARIANTS = {
    "c": [("frame-pointer", 'unwinder = "frame-pointer"'), ("dwarf", 'unwinder = "dwarf"')],
    "python": [("no python walk", "python_frames = false"), ("python walk", "python_frames = true")],
}
WORKLOAD = "c"


def start_router(tmp, all_consumers=False, producer=None):
    config = os.path.join(tmp, "agent.toml")
    extra = """
[consumers.datadog]
agent_url = "http://127.0.0.1:9/profiling/v1/input"
[consumers.otlp]
endpoint = "http://127.0.0.1:9"
""" if all_consumers else f"""
[consumers.count]
plugin = "{REPO}/target/release/libtest_consumer.so"
"""
    with open(config, "w") as f:
        f.write(f"""[producer]
interval = "10s"
frequency_hz = 99
{producer or f'unwinder = "{UNWINDER}"'}
[consumers.perfdata]
path = "{tmp}/profiles"
{extra}""")
    return wait_until_started(subprocess.Popen([ROUTER, "--config", config], stderr=subprocess.PIPE, text=True))


def wait_until_started(router):
    """Returns once the router says it started; its later log is read and dropped."""
    for line in router.stderr:
        if "router started" in line:
            break
    threading.Thread(target=lambda: router.stderr.read(), daemon=True).start()
    return router


def start_perf(tmp):
    proc = subprocess.Popen(["perf", "record", "-F", "99", "-a", "-g", "-o", f"{tmp}/perf.data"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc


def cpu_seconds(pid):
    """CPU time of every thread of `pid` (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{task}/schedstat").read().split()[0])
        except OSError:
            pass
    return total / 1e9


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc):
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=150, help="windows with the router")
    parser.add_argument("--perf-every", type=int, default=3, help="a perf record window per N router windows")
    parser.add_argument("--seconds", type=float, default=1, help="length of a window")
    parser.add_argument("--agent-seconds", type=float, default=60)
    parser.add_argument("--unwinder", choices=["dwarf", "frame-pointer"], default="dwarf")
    parser.add_argument("--workload", choices=["c", "python"], default="c")
    parser.add_argument("--probe-cost-only", action="store_true",
                        help="only the eBPF program's run time per sample, with each probe variant")
    args = parser.parse_args()
    global UNWINDER, WORKLOAD
    UNWINDER, WORKLOAD = args.unwinder, args.workload
    if os.geteuid() != 0:
        sys.exit("run as root: the eBPF producer and perf record -a need it")
    with tempfile.TemporaryDirectory() as tmp:
        workload = Workload(build(tmp, args.workload), tmp)
        try:
            if args.probe_cost_only:
                print_probe_costs(tmp)
            else:
                report(args, tmp, workload)
        finally:
            workload.stop()


def print_probe_costs(tmp, rounds=4):
    """Both probe variants in alternating 10 s runs: this VM's per-sample times wander by 2x
    between runs, so each variant's median over `rounds` runs is compared, not one run each."""
    (base, base_keys), (other, other_keys) = PROBE_VARIANTS[WORKLOAD]
    print(f"eBPF program run time (kernel.bpf_stats_enabled), {WORKLOAD} workload without frame "
          f"pointers, {rounds} alternating rounds:")
    per_sample = {base: [], other: []}
    for _ in range(rounds):
        for label, keys in PROBE_VARIANTS[WORKLOAD]:
            us, line = bpf_program_cost(tmp, keys)
            per_sample[label].append(us)
            print(f"  {label:15s}{line}", flush=True)
    for name, pick in [("median", statistics.median), ("least (the quietest run)", min)]:
        first, second = pick(per_sample[base]), pick(per_sample[other])
        print(f"  {name} per sample: {base} {first:.1f} us, {other} {second:.1f} us "
              f"({other} costs {second - first:+.1f} us)", flush=True)


def report(args, tmp, workload):
    print(f"workload throughput, {args.seconds:g} s windows, profiler restarted around each:", flush=True)
    throughput = {}
    for name, values in alternate(workload, tmp, args.windows, args.perf_every, args.seconds).items():
        mean, half = throughput[name] = confidence(values)
        print(f"  {name:12s} overhead {mean:6.2f} % +- {half:4.2f} (95 % CI {mean - half:5.2f} .. "
              f"{mean + half:5.2f} %, n = {len(values)})", flush=True)

    print(f"\nprofiler's own cost over {args.agent_seconds:.0f} s at 99 Hz, every CPU busy "
          f"(router: unwinder {UNWINDER}):")
    for name, start in [("router", lambda: start_router(tmp, all_consumers=True)),
                        ("perf record", lambda: start_perf(tmp))]:
        proc = start()
        before = cpu_seconds(proc.pid)
        time.sleep(args.agent_seconds)
        used = cpu_seconds(proc.pid) - before
        rss = peak_rss_mb(proc.pid)
        stop(proc)
        share = 100 * used / args.agent_seconds / os.cpu_count()
        print(f"  {name:12s} cpu {used:6.3f} s = {100 * used / args.agent_seconds:5.2f} % of one core"
              f" ({share:4.2f} % of the machine)   peak RSS {rss:6.1f} MB", flush=True)
        if name == "router":
            mean, half = throughput["router"]
            router_total = (f"router in all: {mean:.2f} % sampling + {share:.2f} % own CPU = "
                            f"{mean + share:.2f} % of the workload's throughput (95 % upper bound "
                            f"{mean + half + share:.2f} %)")

    print("\nperf.data size, router and perf record side by side on the same workload:")
    profiles = os.path.join(tmp, "size-profiles")
    router = wait_until_started(subprocess.Popen(
        [ROUTER, "--profiling-interval", "10s", "--profiling-perfdata-path", profiles],
        stderr=subprocess.PIPE, text=True))
    perf = start_perf(tmp)
    time.sleep(20)
    stop(perf)
    stop(router)
    rows = [("router", [os.path.join(profiles, f) for f in os.listdir(profiles) if f.endswith(".data")]),
            ("perf record", [f"{tmp}/perf.data"])]
    for name, files in rows:
        size = sum(os.path.getsize(f) for f in files)
        samples = sum(count_samples(f) for f in files)
        print(f"  {name:12s} {size:>10d} bytes  {samples:>6d} samples  {size / max(samples, 1):7.1f} bytes/sample")

    print("")
    print_probe_costs(tmp)
    print(f"\n{router_total}")


def bpf_program_cost(tmp, producer):
    """Run time per sample of the probe (the sampling program, with the unwinder's tail calls
    inside its run), and its share of the machine."""
    stats = "/proc/sys/kernel/bpf_stats_enabled"
    before = open(stats).read().strip()
    open(stats, "w").write("1")
    try:
        router = start_router(tmp, producer=producer)
        time.sleep(10)
        runs = ns = 0
        for fd in os.listdir(f"/proc/{router.pid}/fdinfo"):
            info = dict(line.split(":", 1) for line in open(f"/proc/{router.pid}/fdinfo/{fd}") if ":" in line)
            if "run_cnt" in info:
                runs += int(info["run_cnt"]); ns += int(info["run_time_ns"])
        stop(router)
    finally:
        open(stats, "w").write(before)
    per_sample = ns / max(runs, 1) / 1000
    share = 100 * ns / 1e9 / (10 * os.cpu_count())
    return per_sample, f"{runs} samples, {per_sample:.1f} us per sample, {share:.3f} % of the machine over 10 s"


def count_samples(path):
    out = subprocess.run(["perf", "script", "-F", "pid", "-i", path], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


if __name__ == "__main__":
    main()
