/* pyparallel internal header: module state, status codes, and the entry points that each
 * concern's C file (kernels.c, team.c, ...) offers to the others. Nothing here is public. */
#ifndef PP_H
#define PP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
} pp_status;

/* Sets the exception for `st` (using `err` as errno for PP_ERR_OS); returns NULL. */
PyObject *pp_raise(pp_status st, int err);

/* Module state: every Python object the module owns, one X() line each, so that the state
 * struct, traverse and clear are generated from a single list and cannot drift apart. */
#define PP_STATE_OBJECTS(X)                                                                        \
    X(KernelType) X(SegmentType) X(SharedViewType) X(SemLockType) X(ChannelType)

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

/* Runs body over [0, n) in chunks of `chunk` indices handed out dynamically to `threads`
 * threads (OpenMP when built with it, pthreads otherwise). Call it with the GIL released.
 * Never fails: if threads cannot be started, the loop runs on the calling thread. */
void pp_parallel_for(Py_ssize_t n, Py_ssize_t chunk, int threads, pp_range_fn body, void *ctx);

/* _core.team_thread_ids(): OS thread ids of the team's threads (they are fork-safe). */
PyObject *pp_team_thread_ids(PyObject *module, PyObject *ignored);

/* Converts a `threads=` argument (None or a positive int) to a team size; -1 on error. */
int pp_threads_arg(PyObject *module, PyObject *arg);

/* ---- kernels.c ---- */
int pp_kernels_exec(PyObject *module, pp_state *st);
extern PyMethodDef pp_kernels_methods[];

/* ---- shm.c: shared segments and typed views with atomics ---- */
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

#endif /* PP_H */
