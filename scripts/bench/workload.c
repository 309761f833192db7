/* CPU-bound workload for the overhead benchmark: one spinning thread per CPU, each counting
 * its units of work in its own 64-byte slot of COUNTER_FILE, which the benchmark reads while
 * the workload runs. The work runs DEPTH calls down a chain, so that the profiler walks stacks
 * as deep as a service's; the benchmark builds it without frame pointers, as distributions
 * build their binaries. Usage: workload COUNTER_FILE (runs until killed). */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

struct slot {
    _Atomic unsigned long units;
    volatile unsigned long sink; /* keeps the work observable */
    char pad[48];
};

__attribute__((noinline)) static unsigned long unit(unsigned long seed) {
    for (int i = 0; i < 10000; i++) seed = seed * 6364136223846793005UL + 1442695040888963407UL;
    return seed;
}

enum { DEPTH = 30 };

/* Calls itself `depth` times, then works forever; the store after the call keeps each frame. */
__attribute__((noinline)) static void descend(struct slot *slot, int depth) {
    if (depth > 0) {
        descend(slot, depth - 1);
        slot->sink += depth;
        return;
    }
    unsigned long seed = 1;
    for (;;) {
        seed = unit(seed);
        slot->sink = seed;
        atomic_fetch_add_explicit(&slot->units, 1, memory_order_relaxed);
    }
}

static void *spin(void *arg) {
    descend(arg, DEPTH);
    return NULL;
}

int main(int argc, char **argv) {
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    int fd = argc > 1 ? open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600) : -1;
    if (fd < 0 || ftruncate(fd, threads * sizeof(struct slot)) < 0) {
        perror("usage: workload COUNTER_FILE");
        return 1;
    }
    struct slot *slots = mmap(NULL, threads * sizeof(struct slot), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (slots == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (long i = 1; i < threads; i++) {
        pthread_t t;
        pthread_create(&t, NULL, spin, &slots[i]);
    }
    spin(&slots[0]);
}
