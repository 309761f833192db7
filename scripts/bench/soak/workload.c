/* The soak test's workload (scripts/bench/soak.sh), built with -O2 -fomit-frame-pointer.
 *   workload spin MS                    burns the CPU for MS milliseconds, a few calls deep, and exits
 *   workload storm RATE SPIN_EVERY MS   a fork storm, until killed: starts RATE processes a second,
 *                                       each /bin/true, except every SPIN_EVERY-th, which is this
 *                                       program spinning for MS milliseconds
 * The soak script copies the binary a thousand times with distinct build ids and runs each copy
 * with `spin`, so that the agent sees many distinct short-lived executables. */
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static volatile unsigned long sink;

__attribute__((noinline)) static void burn(double until) {
    unsigned long seed = 1;
    while (now() < until) {
        for (int i = 0; i < 1000; i++) seed = seed * 6364136223846793005UL + 1442695040888963407UL;
        sink = seed;
    }
}

__attribute__((noinline)) static void middle(double until) {
    burn(until);
    sink += 1;
}

__attribute__((noinline)) static void outer(double until) {
    middle(until);
    sink += 2;
}

static int spin(const char *ms) {
    outer(now() + atof(ms) / 1000.0);
    return 0;
}

_Noreturn static void storm(const char *self, long rate, long spin_every, const char *spin_ms) {
    char *true_argv[] = {"/bin/true", NULL};
    char *spin_argv[] = {(char *)self, "spin", (char *)spin_ms, NULL};
    double period = 1.0 / rate, next = now();
    for (unsigned long n = 0;; n++) {
        char **argv = (spin_every > 0 && n % spin_every == 0) ? spin_argv : true_argv;
        pid_t pid;
        int err = posix_spawn(&pid, argv[0], NULL, NULL, argv, environ);
        if (err) fprintf(stderr, "storm: cannot start %s: %s\n", argv[0], strerror(err));
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        next += period;
        double wait = next - now();
        if (wait > 0) {
            struct timespec t = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
            nanosleep(&t, NULL);
        } else if (wait < -1.0) {
            next = now(); /* fell behind by more than a second: do not try to catch up */
        }
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "spin") == 0) return spin(argv[2]);
    if (argc == 5 && strcmp(argv[1], "storm") == 0) storm(argv[0], atol(argv[2]), atol(argv[3]), argv[4]);
    fprintf(stderr, "usage: %s spin MS | storm RATE SPIN_EVERY MS\n", argv[0]);
    return 2;
}
