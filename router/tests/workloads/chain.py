"""Workloads for the Python stack tests: a chain of pure-Python functions, and a Python
function that spends its time in a C extension (zlib)."""
import sys
import zlib


def leaf(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def mid(n):
    return leaf(n) + 1


def outer():
    while True:
        mid(200_000)


def compressing(data):
    while True:
        zlib.compress(data, 9)


def compress_caller():
    data = bytes(range(256)) * 4096
    compressing(data)


if __name__ == "__main__":
    print("ready", flush=True)
    {"spin": outer, "zlib": compress_caller}[sys.argv[1]]()
