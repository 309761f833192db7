/* Syscall-heavy workload: main -> syscall_loop -> getppid, forever. The syscall instruction
 * sits in syscall_loop itself (libc's syscall() has no frame pointer, which would hide its
 * caller from a frame-pointer unwinder). */
#include <sys/syscall.h>

volatile long sink;

__attribute__((noinline)) void syscall_loop(void) {
    for (;;) {
        long ret;
        __asm__ volatile("syscall" : "=a"(ret) : "0"((long)SYS_getppid) : "rcx", "r11", "memory");
        sink += ret;
    }
}

int main(void) {
    syscall_loop();
    return 0;
}
