/* What an unprivileged process can do to a profiler that runs as root (the tests of
 * router/tests/hostile_files.rs run it as nobody). Every mode spins for SECONDS so that the
 * agent samples it, in code of its own or in anonymous executable memory (as JIT code runs):
 *
 *   hostile truncate LIB SECONDS      over and over: copies LIB (into a file it owns), a child
 *                                     maps the copy and spins while the parent keeps truncating
 *                                     the copy to a third and writing the rest back
 *   hostile fifo-library LIB SECONDS  maps LIB, deletes it and puts a FIFO at its path
 *   hostile fuse-library LIB SECONDS  maps LIB (on a FUSE file system), then creates ./hang,
 *                                     which tells the test's FUSE daemon to stop answering
 *   hostile jit MAP SECONDS           runs code in anonymous memory; MAP is prepared by the
 *                                     caller as /tmp/perf-PID.map ("link:TARGET", "fifo", or
 *                                     "sparse:BYTES")
 *
 * Prints what it did on stdout when done ("truncations N").
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void spin_until(double end) {
    volatile unsigned long x = 0;
    while (now() < end)
        for (int i = 0; i < 100000; i++) x += i;
}

/* Truncates `path` to a third and writes the rest back, until `child` exits; returns how
 * many times. */
static long truncate_while_alive(const char *path, pid_t child) {
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror("open"); exit(2); }
    struct stat st;
    fstat(fd, &st);
    off_t keep = st.st_size / 3;
    size_t tail_len = st.st_size - keep;
    char *tail = malloc(tail_len);
    if (pread(fd, tail, tail_len, keep) != (ssize_t)tail_len) { perror("pread"); exit(2); }
    long count = 0;
    while (waitpid(child, NULL, WNOHANG) == 0) {
        if (ftruncate(fd, keep) != 0) { perror("ftruncate"); exit(2); }
        usleep(200);
        if (pwrite(fd, tail, tail_len, keep) != (ssize_t)tail_len) { perror("pwrite"); exit(2); }
        count++;
        usleep(200);
    }
    free(tail);
    close(fd);
    return count;
}

static void copy_file(const char *from, const char *to) {
    int in = open(from, O_RDONLY), out = open(to, O_CREAT | O_WRONLY | O_TRUNC, 0755);
    if (in < 0 || out < 0) { perror("copy"); exit(2); }
    char buffer[65536];
    ssize_t n;
    while ((n = read(in, buffer, sizeof buffer)) > 0)
        if (write(out, buffer, n) != n) { perror("write"); exit(2); }
    close(in);
    close(out);
}

/* A child maps a fresh copy of `library` and spins; the parent truncates the copy under it. */
static void truncate_mapped_copies(const char *library, double end) {
    long truncations = 0;
    int rounds = 0;
    while (now() < end) {
        char copy[4096];
        snprintf(copy, sizeof copy, "%s.%d", library, rounds++);
        copy_file(library, copy);
        int loaded[2];
        if (pipe(loaded) != 0) { perror("pipe"); exit(2); }
        pid_t child = fork();
        if (child == 0) {
            if (!dlopen(copy, RTLD_NOW)) { fprintf(stderr, "dlopen: %s\n", dlerror()); _exit(3); }
            if (write(loaded[1], "x", 1) != 1) _exit(3);
            spin_until(now() + 0.5);
            /* Not `exit`: the library's destructors would run from pages that the
             * truncations took away (its relocated data among them). */
            _exit(0);
        }
        char byte;
        close(loaded[1]);
        if (read(loaded[0], &byte, 1) == 1) truncations += truncate_while_alive(copy, child);
        else waitpid(child, NULL, 0);
        close(loaded[0]);
        unlink(copy);
    }
    printf("truncations %ld rounds %d\n", truncations, rounds);
}

/* Anonymous executable memory running `jmp .` (a JIT's code, as the agent sees it). */
static void *run_jit_code(void *arg) {
    (void)arg;
    unsigned char *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) { perror("mmap"); exit(2); }
    code[0] = 0xeb; /* jmp rel8 */
    code[1] = 0xfe; /* -2: itself */
    ((void (*)(void))code)();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: hostile truncate|fifo-library|jit ARG SECONDS\n");
        return 2;
    }
    const char *mode = argv[1], *arg = argv[2];
    double end = now() + atof(argv[3]);
    if (strcmp(mode, "truncate") == 0) {
        truncate_mapped_copies(arg, end);
        return 0;
    }
    if (strcmp(mode, "fifo-library") == 0) {
        if (!dlopen(arg, RTLD_NOW)) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
        /* /proc/PID/maps now says "LIB (deleted)": an agent without map_files opens LIB. */
        if (unlink(arg) != 0 || mkfifo(arg, 0644) != 0) { perror("fifo"); return 2; }
        spin_until(end);
        printf("fifo at %s\n", arg);
        return 0;
    }
    if (strcmp(mode, "fuse-library") == 0) {
        if (!dlopen(arg, RTLD_NOW)) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
        int flag = open("hang", O_CREAT | O_WRONLY, 0644);
        if (flag < 0) { perror("hang"); return 2; }
        close(flag);
        spin_until(end);
        printf("fuse library %s\n", arg);
        /* Not `return`: the library's pages are behind a daemon that answers no more. */
        fflush(stdout);
        _exit(0);
    }
    if (strcmp(mode, "jit") == 0) {
        char map[64];
        snprintf(map, sizeof map, "/tmp/perf-%d.map", getpid());
        unlink(map);
        if (strncmp(arg, "link:", 5) == 0) {
            if (symlink(arg + 5, map) != 0) { perror("symlink"); return 2; }
        } else if (strcmp(arg, "fifo") == 0) {
            if (mkfifo(map, 0644) != 0) { perror("mkfifo"); return 2; }
        } else if (strncmp(arg, "sparse:", 7) == 0) {
            int fd = open(map, O_CREAT | O_WRONLY | O_TRUNC, 0644);
            if (fd < 0 || ftruncate(fd, atoll(arg + 7)) != 0) { perror("sparse"); return 2; }
            close(fd);
        }
        pthread_t thread;
        pthread_create(&thread, NULL, run_jit_code, NULL);
        while (now() < end) usleep(10000);
        unlink(map);
        printf("jit %s\n", arg);
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
