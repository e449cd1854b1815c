/* util.h: small GIL-free helpers shared by channel.c, sync.c and queue.c (clock, futex,
 * cpu-relax, /proc/<pid>/stat, pid liveness, the cached pid). Internal; every function is
 * static inline so each file gets its own. */
#ifndef PP_UTIL_H
#define PP_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* CLOCK_MONOTONIC in nanoseconds. */
static inline int64_t
pp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One pause of a spin loop (lets the sibling hyper-thread run). */
static inline void
pp_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- Adaptive spinning ----
 * Polling before sleeping saves a wake-up only when the other side runs on another CPU and
 * answers within the spin; on a busy machine the spinner takes the CPU of the very process it
 * waits for. So each waiter keeps a gate (process-local: in its object, never in shared
 * memory): it spins while its spins pay; after a spin that did not pay it sleeps at once, and
 * probes with a spin again after 2, 4, 8, ... waits (up to 1 << PP_TUNE_SPIN_BACKOFF_MAX) for
 * as long as probes do not pay either: a quiet machine is back to spinning after two waits, a
 * busy one spins on one wait in 64.
 * Races between threads sharing a gate only make a spin more or less: relaxed atomics. */
typedef struct {
    _Atomic int backoff;   /* 0: spin; k > 0: the last k probes did not pay */
    _Atomic int countdown; /* waits until the next probe */
} pp_spin_gate;

/* How long this wait may spin: ns, or 0 (sleep at once). */
static inline int64_t
pp_spin_budget(pp_spin_gate *g, int64_t ns)
{
    if (ns <= 0 || atomic_load_explicit(&g->backoff, memory_order_relaxed) == 0) {
        return ns;
    }
    return atomic_fetch_sub_explicit(&g->countdown, 1, memory_order_relaxed) <= 1 ? ns : 0;
}

/* What the spin of a wait came to: it found what it waited for (paid) or not. */
static inline void
pp_spin_record(pp_spin_gate *g, int paid)
{
    if (paid) {
        atomic_store_explicit(&g->backoff, 0, memory_order_relaxed);
        return;
    }
    int k = atomic_load_explicit(&g->backoff, memory_order_relaxed);
    if (k < PP_TUNE_SPIN_BACKOFF_MAX) {
        k++;
    }
    atomic_store_explicit(&g->backoff, k, memory_order_relaxed);
    atomic_store_explicit(&g->countdown, 1 << k, memory_order_relaxed);
}

/* Sleeps while *word == expected, for at most ns nanoseconds (shared futex: the word may be
 * in memory mapped by several processes). -1 with errno (EAGAIN, ETIMEDOUT, EINTR) or 0. */
static inline int
pp_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000LL),
                          .tv_nsec = (long)(ns % 1000000000LL)};
    return (int)syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

/* Wakes up to n sleepers on word. */
static inline void
pp_futex_wake(_Atomic uint32_t *word, int n)
{
    (void)syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Reads the state letter and start time (clock ticks since boot) of process pid from
 * /proc/<pid>/stat; -1 when it does not exist (or cannot be read). */
static inline int
pp_proc_stat(pid_t pid, char *state, unsigned long long *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) {
        return -1;
    }
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may contain anything but ends here */
    if (p == NULL || p[1] != ' ') {
        return -1;
    }
    *state = p[2];
    p += 3;
    for (int field = 4; field < 22 && p != NULL; field++) { /* starttime is field 22 */
        p = strchr(p + 1, ' ');
    }
    *start = p != NULL ? strtoull(p + 1, NULL, 10) : 0;
    return 0;
}

/* True when process pid is gone or a zombie (it can never release what it holds). */
static inline int
pp_proc_dead(pid_t pid)
{
    if (kill(pid, 0) < 0 && errno == ESRCH) {
        return 1;
    }
    char state;
    unsigned long long start;
    if (pp_proc_stat(pid, &state, &start) < 0) {
        return errno == ENOENT;
    }
    return state == 'Z' || state == 'X';
}

/* This process's pid, cached: getpid() is a system call and every lock operation needs the
 * pid. A pid belongs to the process, not to a module instance, so the cell is process-wide
 * (one per file that uses it), set on first use and reset in a forked child by a
 * pthread_atfork handler installed once. */
static inline _Atomic uint32_t *
pp_self_pid_cell(void)
{
    static _Atomic uint32_t cell;
    return &cell;
}

static inline void
pp_self_pid_reset(void)
{
    atomic_store_explicit(pp_self_pid_cell(), (uint32_t)getpid(), memory_order_relaxed);
}

static inline void
pp_self_pid_init(void)
{
    pp_self_pid_reset();
    (void)pthread_atfork(NULL, NULL, pp_self_pid_reset);
}

static inline uint32_t
pp_self_pid(void)
{
    uint32_t pid = atomic_load_explicit(pp_self_pid_cell(), memory_order_relaxed);
    if (pid == 0) {
        static pthread_once_t once = PTHREAD_ONCE_INIT;
        (void)pthread_once(&once, pp_self_pid_init);
        pid = atomic_load_explicit(pp_self_pid_cell(), memory_order_relaxed);
    }
    return pid;
}

#endif /* PP_UTIL_H */
