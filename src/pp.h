/* pyparallel internal header: module state, status codes, and the entry points that each
 * concern's C file (kernels.c, team.c, ...) offers to the others. Nothing here is public. */
#ifndef PP_H
#define PP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stddef.h> /* offsetof: Python >= 3.12's headers no longer include it */
#include <stdint.h>

#ifndef PP_VERSION
#error "PP_VERSION must be defined by the build (setup.py)"
#endif

/* Status codes for code that runs without the GIL: it returns one of these and never touches
 * the exception state; pp_raise() turns it into an exception once the GIL is back. */
typedef enum {
    PP_OK = 0,
    PP_ERR_NOMEM,     /* allocation failed */
    PP_ERR_OS,        /* a system call failed; errno says which */
    PP_ERR_OVERFLOW,  /* a result does not fit */
    PP_ERR_TIMEOUT,   /* a timed wait expired */
    PP_ERR_INTERRUPT, /* a wait was interrupted by a signal that Python must see */
    PP_ERR_CLOSED,    /* the other side has gone away */
    PP_ERR_CANCELLED, /* a CancelToken asked a kernel to stop */
} pp_status;

/* ---- Tunables: every hard-coded time, size and threshold of the C core, in one table ----
 * (the Python side has its own table; the channel's spin and lease times can be passed from
 * Python per call, these are their defaults). */
/* kernels.c, team.c */
/* A caller waiting for a kernel runs signal handlers and checks its CancelToken this often. */
#define PP_TUNE_WATCH_SLICE_NS 10000000LL /* 10 ms */
/* threads= is capped at this many per usable CPU, and at PP_TUNE_MAX_THREADS_ABS in all. */
#define PP_TUNE_THREADS_PER_CPU 4
#define PP_TUNE_MAX_THREADS_ABS 1024
/* Conversions with the GIL held check signals (and the token) every this many items. */
#define PP_TUNE_CONVERT_CHECK 16384
/* fib(n): below _RELEASE the GIL is kept (too short to release it for); from _HELPER (about
 * 10 ms) a scalar call computes on a helper thread while the caller stays interruptible
 * (below, it ends within 100 ms anyway); the recursion checks the stop flag above _CHECK. */
#define PP_TUNE_FIB_RELEASE 24
#define PP_TUNE_FIB_HELPER 32
#define PP_TUNE_FIB_CHECK 30
/* cube_loop(n): the same, and the iterations between two checks of the stop flag. */
#define PP_TUNE_CUBE_RELEASE 20000
#define PP_TUNE_CUBE_HELPER (1LL << 23)
#define PP_TUNE_CUBE_CHECK (1LL << 20)
/* square/weighted_multiply .map and weighted_multiply_buffer: items per chunk, and the size
 * below which they run with the GIL held. */
#define PP_TUNE_MUL_CHUNK 65536
#define PP_TUNE_MUL_RELEASE 65536
/* weighted_multiply converts, multiplies and builds this many items at a time (its scratch
 * stays in cache and is reused instead of faulting in memory for every item of a big list). */
#define PP_TUNE_WM_BLOCK 8192
#define PP_TUNE_BUF_CHUNK 65536
#define PP_TUNE_BUF_RELEASE 32768
/* channel.c, shm.c */
#define PP_TUNE_NOGIL_COPY 65536      /* copies at least this big release the GIL */
#define PP_TUNE_WAIT_SLICE_MS 100     /* a blocked worker-side wait looks at signals */
#define PP_TUNE_WORKER_SPIN_NS 50000  /* a worker polls this long before it sleeps (50 us) */
#define PP_TUNE_SPIN_LEASE_NS 1000000 /* a collecting caller's lease (1 ms), see spin() */
/* util.h's adaptive spinning: after spins that did not pay, waits sleep at once and probe
 * with a spin after 2, 4, 8, ... waits, at most 1 << this many. */
#define PP_TUNE_SPIN_BACKOFF_MAX 6
/* sync.c */
#define PP_TUNE_LOCK_SLICE_NS 50000000LL /* lock waits check signals and dead owners (50 ms) */
#define PP_TUNE_LOCK_SPINS 64            /* attempts before a lock wait sleeps */

/* Sets the exception for `st` (using `err` as errno for PP_ERR_OS); returns NULL. */
PyObject *pp_raise(pp_status st, int err);

/* Module state: every Python object the module owns, one X() line each, so that the state
 * struct, traverse and clear are generated from a single list and cannot drift apart. */
// clang-format off
#define PP_STATE_OBJECTS(X) \
    X(KernelType) X(CancelTokenType) X(KernelCancelled) \
    X(SegmentType) X(SharedViewType) X(SemLockType) X(ChannelType)
// clang-format on

typedef struct {
#define PP_DECLARE_FIELD(name) PyObject *name;
    PP_STATE_OBJECTS(PP_DECLARE_FIELD)
#undef PP_DECLARE_FIELD
    int default_threads; /* team size when a call passes threads=None; set by the package */
} pp_state;

extern PyModuleDef pp_moduledef;

static inline pp_state *
pp_get_state(PyObject *module)
{
    return (pp_state *)PyModule_GetState(module);
}

/* ---- team.c: one parallel loop, fork-safe, run without the GIL ---- */

/* Body of a parallel loop: handles indices [lo, hi). Must not touch Python objects. */
typedef void (*pp_range_fn)(void *ctx, Py_ssize_t lo, Py_ssize_t hi);

/* What a caller waiting (GIL released) for a kernel watches: signals and a CancelToken. */
typedef struct {
    _Atomic int stop;         /* set to stop the run; the computing threads check it */
    const _Atomic int *token; /* the flag of a CancelToken, or NULL */
    PyThreadState *tstate;    /* the caller's, saved while the GIL is released */
    pp_status why;            /* PP_OK, PP_ERR_INTERRUPT (exception set), PP_ERR_CANCELLED */
} pp_watch;

/* Called by the waiting caller with the GIL released, every PP_TUNE_WATCH_SLICE_NS: takes the
 * GIL, runs signal handlers (KeyboardInterrupt), checks the token; 1 (and w->stop set) when
 * the run must stop. */
int pp_watch_poll(pp_watch *w);

/* Runs body over [0, n) in chunks of `chunk` indices handed out dynamically to `threads`
 * threads (OpenMP when built with it, pthreads otherwise). Call it with the GIL released and,
 * when w is not NULL, w->tstate holding the saved thread state: the caller then polls w
 * while it waits. Returns 1 when stopped early (results incomplete), else 0. Never fails: if
 * threads cannot be started, the loop runs on the calling thread. */
int pp_parallel_for(Py_ssize_t n, Py_ssize_t chunk, int threads, pp_range_fn body, void *ctx,
                    pp_watch *w);

/* Runs fn(arg, &w->stop) on a new thread while the caller (GIL released, w->tstate set) polls
 * w; 1 when stopped early. Without a thread, runs it on the caller. */
int pp_run_helper(void (*fn)(void *arg, const _Atomic int *stop), void *arg, pp_watch *w);

/* _core.team_thread_ids(): OS thread ids of the team's threads (they are fork-safe). */
PyObject *pp_team_thread_ids(PyObject *module, PyObject *ignored);

/* Converts a `threads=` argument (None or a positive int) to a team size; -1 on error. */
int pp_threads_arg(PyObject *module, PyObject *arg);

/* ---- kernels.c ---- */
int pp_kernels_exec(PyObject *module, pp_state *st);
extern PyMethodDef pp_kernels_methods[];

/* ---- shm.c: shared segments and typed views with atomics ---- */
int pp_open_peer_fd(long pid, int fd, unsigned long long ino, Py_ssize_t min_size, const char *what,
                    const char *sender);
int pp_shm_exec(PyObject *module, pp_state *st);

/* ---- sync.c: process-shared locks and semaphores ---- */
int pp_sync_exec(PyObject *module, pp_state *st);
/* 1 when `o` is a pyparallel SemLock (then pp_lock_enter/exit may take fast=1). */
int pp_is_semlock(PyObject *o);
/* Acquires (blocking) / releases `lock`: 0 or 1 on success, -1 with an exception set. */
int pp_lock_enter(PyObject *lock, int fast);
int pp_lock_exit(PyObject *lock, int fast);
/* ---- channel.c: shared-memory rings between a pool's parent and its workers ---- */
int pp_channel_exec(PyObject *module, pp_state *st);

/* ---- codec.c: lists of plain numbers packed into arrays, for the pool's messages ---- */
extern PyMethodDef pp_codec_methods[];

/* ---- forkutil.c: fork() for the pool's workers ---- */
extern PyMethodDef pp_forkutil_methods[];

#endif /* PP_H */
