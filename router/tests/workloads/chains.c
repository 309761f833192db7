/* CPU-bound workloads with known call chains, built by the tests WITHOUT frame pointers
 * (gcc -O2 -fomit-frame-pointer), as users' binaries are.
 * Usage: chains MODE [seconds]   (default: forever)
 *   spin    main -> outer -> mid -> spin     (spin is a leaf and sets up no frame; mid's frame is 40 KB)
 *   qsort   main -> sort_batch -> qsort (Debian's libc) -> compare_keys
 *   thread  start_thread -> worker -> thread_spin          (on a pthread; main waits) */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

volatile unsigned long sink;
static double seconds;
static struct timespec started;

static int time_is_up(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return seconds > 0 && (now.tv_sec - started.tv_sec) + (now.tv_nsec - started.tv_nsec) / 1e9 >= seconds;
}

/* Each caller does work after its call, so -O2 cannot turn the call into a jump. */
__attribute__((noinline)) void spin(unsigned long n) {
    for (unsigned long i = 0; i < n; i++) sink += i * i;
}

/* A frame of more than 32 KiB: its CFA offset needs the unwinder's scaled rule. */
__attribute__((noinline)) void mid(unsigned long n) {
    volatile char scratch[40000];
    scratch[n % sizeof scratch] = 1;
    spin(n);
    sink ^= n + scratch[0];
}

__attribute__((noinline)) void outer(void) {
    while (!time_is_up()) {
        mid(2000000);
        sink += 3;
    }
}

__attribute__((noinline)) int compare_keys(const void *a, const void *b) {
    unsigned long x = *(const unsigned long *)a, y = *(const unsigned long *)b;
    for (int i = 0; i < 200; i++) sink += i ^ x;
    return x < y ? -1 : x > y;
}

__attribute__((noinline)) void sort_batch(void) {
    enum { N = 4096 };
    static unsigned long keys[N];
    while (!time_is_up()) {
        for (int i = 0; i < N; i++) keys[i] = (unsigned long)rand();
        qsort(keys, N, sizeof keys[0], compare_keys);
        sink += keys[0];
    }
}

__attribute__((noinline)) void thread_spin(unsigned long n) {
    for (unsigned long i = 0; i < n; i++) sink += i * 3;
}

__attribute__((noinline)) void *worker(void *arg) {
    (void)arg;
    while (!time_is_up()) {
        thread_spin(2000000);
        sink += 5;
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "spin";
    seconds = argc > 2 ? atof(argv[2]) : 0;
    clock_gettime(CLOCK_MONOTONIC, &started);
    if (strcmp(mode, "qsort") == 0) {
        sort_batch();
    } else if (strcmp(mode, "thread") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, worker, NULL);
        pthread_join(t, NULL);
    } else {
        outer();
    }
    sink += 1;
    return 0;
}
