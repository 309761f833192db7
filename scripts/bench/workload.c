/* Fixed-duration CPU-bound workload: prints how many units of work it finished.
 * Usage: workload SECONDS */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) unsigned long unit(unsigned long seed) {
    for (int i = 0; i < 100000; i++) seed = seed * 6364136223846793005UL + 1442695040888963407UL;
    return seed;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5, end = now() + seconds;
    unsigned long units = 0, seed = 1;
    while (now() < end) {
        for (int i = 0; i < 100; i++) seed = unit(seed);
        units += 100;
    }
    printf("%lu %lu\n", units, seed & 1);
    return 0;
}
