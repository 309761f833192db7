/* A process that spins with a DD_SERVICE of any size in its /proc/PID/environ, as any user can
 * make one: execve caps each variable at 128 KiB, so with the argument `join` the program turns
 * the NULs after DD_SERVICE into 'x' in its own environment block, joining every variable that
 * follows into one value. Without it, it only spins.  Usage: hostile_environ [join] */
#include <string.h>

extern char **environ;
volatile unsigned long sink;

__attribute__((noinline)) static void spin(void) {
    for (;;) sink++;
}

int main(int argc, char **argv) {
    char *service = NULL, *end = NULL;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "DD_SERVICE=", 11) == 0) service = *e;
        char *past = *e + strlen(*e);
        if (past > end) end = past;
    }
    if (argc > 1 && strcmp(argv[1], "join") == 0 && service)
        for (char *p = service; p < end; p++)
            if (*p == 0) *p = 'x';
    spin();
    return 0;
}
