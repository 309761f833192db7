"""Python workload for the overhead benchmark (scripts/bench/overhead.py --workload python):
one process per CPU, each a chain of ten pure-Python functions with the work at the bottom,
counting its units of work in its own 64-byte slot of COUNTER_FILE, which the benchmark reads
while the workload runs. Usage: python3 workload.py COUNTER_FILE (runs until killed)."""
import mmap
import os
import struct
import sys


def work(slot, counters):
    seed = 1
    while True:
        for _ in range(1000):
            seed = (seed * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        units = struct.unpack_from("<Q", counters, slot)[0]
        struct.pack_into("<Q", counters, slot, units + 1)


def level1(s, c): work(s, c)
def level2(s, c): level1(s, c)
def level3(s, c): level2(s, c)
def level4(s, c): level3(s, c)
def level5(s, c): level4(s, c)
def level6(s, c): level5(s, c)
def level7(s, c): level6(s, c)
def level8(s, c): level7(s, c)
def level9(s, c): level8(s, c)
def level10(s, c): level9(s, c)


def main():
    path = sys.argv[1]
    cpus = os.cpu_count()
    with open(path, "wb") as f:
        f.write(b"\0" * 64 * cpus)
    for cpu in range(cpus):
        if os.fork() == 0:
            with open(path, "r+b") as f:
                counters = mmap.mmap(f.fileno(), 64 * cpus)
            level10(64 * cpu, counters)
    os.wait()


if __name__ == "__main__":
    main()
