/* CPU-bound workload with a known call chain: main -> outer_work -> inner_spin.
 * Usage: spin [seconds]  (default: forever) */
#include <stdlib.h>
#include <time.h>

volatile unsigned long sink;

__attribute__((noinline)) void inner_spin(void) {
    for (unsigned long i = 0; i < 10000000UL; i++) sink += i * i;
}

__attribute__((noinline)) void outer_work(double seconds) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        inner_spin();
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (seconds <= 0 || (now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
}

int main(int argc, char **argv) {
    outer_work(argc > 1 ? atof(argv[1]) : 0);
    return 0;
}
