/* CPU-bound workload for the overhead benchmark: one spinning thread per CPU, each counting
 * its units of work in its own 64-byte slot of COUNTER_FILE, which the benchmark reads while
 * the workload runs. The work runs 30 calls down a chain of distinct functions, so that the profiler walks stacks
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

/* The work, at the bottom of the chain. */
__attribute__((noinline)) static void work(struct slot *slot) {
    unsigned long seed = 1;
    for (;;) {
        seed = unit(seed);
        slot->sink = seed;
        atomic_fetch_add_explicit(&slot->units, 1, memory_order_relaxed);
    }
}

/* Thirty distinct functions calling each other down to work(); the store after each call
 * keeps its frame (no tail call). */
#define LEVEL(n, next)                                                  \
    __attribute__((noinline)) static void level##n(struct slot *slot) { \
        next(slot);                                                     \
        slot->sink += n;                                                \
    }
LEVEL(1, work) LEVEL(2, level1) LEVEL(3, level2) LEVEL(4, level3) LEVEL(5, level4)
LEVEL(6, level5) LEVEL(7, level6) LEVEL(8, level7) LEVEL(9, level8) LEVEL(10, level9)
LEVEL(11, level10) LEVEL(12, level11) LEVEL(13, level12) LEVEL(14, level13) LEVEL(15, level14)
LEVEL(16, level15) LEVEL(17, level16) LEVEL(18, level17) LEVEL(19, level18) LEVEL(20, level19)
LEVEL(21, level20) LEVEL(22, level21) LEVEL(23, level22) LEVEL(24, level23) LEVEL(25, level24)
LEVEL(26, level25) LEVEL(27, level26) LEVEL(28, level27) LEVEL(29, level28) LEVEL(30, level29)

static void *spin(void *arg) {
    level30(arg);
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
