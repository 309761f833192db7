#!/usr/bin/env python3
"""Overhead of the agent, measured side by side in one run.

1. Throughput of a CPU-bound workload on every CPU, alternating: no profiler, the router
   (eBPF at 99 Hz, perfdata consumer + a counting consumer), and `perf record -F 99 -a -g`.
2. The router's own CPU time and peak RSS over a longer run (perfdata, Datadog and OTLP
   consumers loaded, their backends absent so they queue and retry), next to perf record's.
3. Bytes per sample of our perf.data files next to perf record's, same workload, same time.
4. The eBPF program's own run time per sample (kernel.bpf_stats_enabled, /proc/PID/fdinfo).

Usage (root): scripts/bench/overhead.py [--seconds 10] [--rounds 3] [--agent-seconds 60]
"""
import argparse, os, signal, subprocess, sys, tempfile, time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTER = os.path.join(REPO, "target/release/router")


def build(tmp):
    subprocess.run(["cargo", "build", "--release", "--workspace", "--quiet"], cwd=REPO, check=True)
    binary = os.path.join(tmp, "workload")
    subprocess.run(["cc", "-O2", "-o", binary, os.path.join(REPO, "scripts/bench/workload.c")], check=True)
    return binary


def workload_units(binary, seconds):
    """Runs one workload copy per CPU; returns the total units of work."""
    procs = [subprocess.Popen([binary, str(seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(os.cpu_count())]
    return sum(int(p.communicate()[0].split()[0]) for p in procs)


def start_router(tmp, all_consumers=False):
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
[consumers.perfdata]
path = "{tmp}/profiles"
{extra}""")
    proc = subprocess.Popen([ROUTER, "--config", config], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "router started" in line:
            break
    return proc


def start_perf(tmp):
    proc = subprocess.Popen(["perf", "record", "-F", "99", "-a", "-g", "-o", f"{tmp}/perf.data"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agent-seconds", type=float, default=60)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the eBPF producer and perf record -a need it")
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(tmp)
        results = {"none": [], "router": [], "perf record": []}
        for r in range(args.rounds):
            for name in results:
                helper = {"none": lambda: None, "router": lambda: start_router(tmp),
                          "perf record": lambda: start_perf(tmp)}[name]()
                units = workload_units(binary, args.seconds)
                if helper:
                    stop(helper)
                results[name].append(units)
                print(f"round {r + 1} {name:12s} {units:>12d} units", flush=True)
        base = sum(results["none"]) / len(results["none"])
        print("\nthroughput of the workload on every CPU (mean of rounds, alternating):")
        for name, units in results.items():
            mean = sum(units) / len(units)
            print(f"  {name:12s} {mean:14.0f} units   overhead {100 * (1 - mean / base):6.2f} %")

        print(f"\nprofiler's own cost over {args.agent_seconds:.0f} s at 99 Hz, every CPU busy:")
        for name, start in [("router", lambda: start_router(tmp, all_consumers=True)),
                            ("perf record", lambda: start_perf(tmp))]:
            proc = start()
            load = [subprocess.Popen([binary, str(args.agent_seconds)], stdout=subprocess.DEVNULL)
                    for _ in range(os.cpu_count())]
            before = cpu_seconds(proc.pid)
            time.sleep(args.agent_seconds)
            used = cpu_seconds(proc.pid) - before
            rss = peak_rss_mb(proc.pid)
            stop(proc)
            for p in load:
                p.wait()
            print(f"  {name:12s} cpu {used:6.2f} s = {100 * used / args.agent_seconds:5.2f} % of one core"
                  f"   peak RSS {rss:6.1f} MB")

        print("\nperf.data size, router and perf record side by side on the same workload:")
        profiles = os.path.join(tmp, "size-profiles")
        subprocess.run(["rm", "-rf", profiles])
        router = subprocess.Popen([ROUTER, "--profiling-interval", "10s", "--profiling-perfdata-path", profiles],
                                  stderr=subprocess.PIPE, text=True)
        for line in router.stderr:
            if "router started" in line:
                break
        perf = start_perf(tmp)
        workload_units(binary, 20)
        stop(perf)
        stop(router)
        rows = [("router", [os.path.join(profiles, f) for f in os.listdir(profiles) if f.endswith(".data")]),
                ("perf record", [f"{tmp}/perf.data"])]
        for name, files in rows:
            size = sum(os.path.getsize(f) for f in files)
            samples = sum(count_samples(f) for f in files)
            print(f"  {name:12s} {size:>10d} bytes  {samples:>6d} samples  {size / max(samples, 1):7.1f} bytes/sample")

        print("\neBPF program run time (kernel.bpf_stats_enabled):")
        print("  " + bpf_program_cost(tmp, binary))


def bpf_program_cost(tmp, binary):
    """Run time per sample of the probe, and its share of the machine."""
    stats = "/proc/sys/kernel/bpf_stats_enabled"
    before = open(stats).read().strip()
    open(stats, "w").write("1")
    try:
        router = start_router(tmp)
        workload_units(binary, 10)
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
    return f"{runs} samples, {per_sample:.1f} us per sample, {share:.3f} % of the machine over 10 s"


def count_samples(path):
    out = subprocess.run(["perf", "script", "-F", "pid", "-i", path], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


if __name__ == "__main__":
    main()
