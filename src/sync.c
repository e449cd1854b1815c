/* sync.c: SemLock, the process-shared primitive under pyparallel's Lock, RLock, Semaphore and
 * BoundedSemaphore (Condition, Event and Barrier are composed from it in pyparallel/shared.py,
 * as multiprocessing.synchronize composes them from _multiprocessing.SemLock).
 *
 * The state is a few C11 atomics at an offset of a shared segment, and waits are futex waits on
 * its first word:
 *   - locks (LOCK, RLOCK): word = pid of the owner, 0 when free. A waiter that has slept a whole
 *     slice checks that the owner is alive; when it died (or is a zombie), the waiter takes the
 *     lock over with one compare-exchange and records that it was abandoned (robustness).
 *   - semaphores: word = the count.
 * Waits release the GIL, honour timeouts, retry on EINTR and return at least every
 * PP_TUNE_LOCK_SLICE_NS so that the caller can run PyErr_CheckSignals() (Ctrl-C). */
#include "pp.h"
#include "util.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PP_KIND_LOCK 0
#define PP_KIND_RLOCK 1
#define PP_KIND_SEMAPHORE 2

#define PP_SEM_VALUE_MAX INT_MAX
#define PP_TIMEOUT_MAX 1e9 /* seconds; keeps the deadline in a long long of ns */

/* The shared state; 64 bytes are reserved for it by the Python side. */
typedef struct {
    _Atomic uint32_t word;      /* lock: owner pid or 0; semaphore: count */
    _Atomic uint32_t waiters;   /* sleepers on word */
    _Atomic uint64_t owner_tid; /* thread ident of the owner (locks) */
    _Atomic uint32_t count;     /* recursion depth (RLOCK), touched only by the owner */
    uint32_t maxvalue;
    uint32_t kind;
} pp_semstate;

typedef struct {
    PyObject_HEAD
    Py_buffer seg_view; /* keeps the segment mapped */
    pp_semstate *s;
    int kind;
    int abandoned; /* the last acquire through this object recovered a dead owner's lock */
} SemLockObject;

/* ---- GIL-free helpers ---- */

/* True when process `pid` is gone or a zombie (it can never release what it holds). */
static int
pp_pid_dead(uint32_t pid)
{
    if (kill((pid_t)pid, 0) < 0 && errno == ESRCH) {
        return 1;
    }
    char state;
    unsigned long long start;
    if (pp_proc_stat((pid_t)pid, &state, &start) < 0) {
        return errno == ENOENT;
    }
    return state == 'Z' || state == 'X';
}

/* One non-blocking attempt. 1: acquired, 0: not. */
static int
pp_try(pp_semstate *s, int kind, uint32_t me)
{
    uint32_t v = atomic_load_explicit(&s->word, memory_order_relaxed);
    if (kind == PP_KIND_SEMAPHORE) {
        while (v > 0) {
            if (atomic_compare_exchange_weak(&s->word, &v, v - 1)) {
                return 1;
            }
        }
        return 0;
    }
    if (v != 0) {
        return 0;
    }
    return atomic_compare_exchange_strong(&s->word, &v, me);
}

/* Takes a lock whose owner died; 1 when this call got it. */
static int
pp_take_abandoned(pp_semstate *s, uint32_t me)
{
    uint32_t owner = atomic_load(&s->word);
    if (owner == 0 || owner == me || !pp_pid_dead(owner)) {
        return 0;
    }
    return atomic_compare_exchange_strong(&s->word, &owner, me);
}

/* Waits (GIL released) until acquired (PP_OK, *abandoned set when taken from a dead owner),
 * the deadline passes (PP_ERR_TIMEOUT; deadline < 0 means none), or a signal or the end of a
 * slice asks the caller to check signals (PP_ERR_INTERRUPT). */
static pp_status
pp_sem_wait(pp_semstate *s, int kind, uint32_t me, long long deadline, int *abandoned)
{
    for (int i = 0; i < PP_TUNE_LOCK_SPINS; i++) {
        if (pp_try(s, kind, me)) {
            return PP_OK;
        }
        pp_cpu_relax();
    }
    long long slice_end = pp_now_ns() + PP_TUNE_LOCK_SLICE_NS;
    for (;;) {
        if (pp_try(s, kind, me)) {
            return PP_OK;
        }
        uint32_t observed = atomic_load(&s->word);
        if (kind == PP_KIND_SEMAPHORE ? observed > 0 : observed == 0) {
            continue;
        }
        long long now = pp_now_ns();
        if (deadline >= 0 && now >= deadline) {
            return PP_ERR_TIMEOUT;
        }
        if (now >= slice_end) {
            return PP_ERR_INTERRUPT;
        }
        long long end = slice_end;
        if (deadline >= 0 && deadline < end) {
            end = deadline;
        }
        atomic_fetch_add(&s->waiters, 1);
        int r = pp_futex_wait(&s->word, observed, end - now);
        int err = errno;
        atomic_fetch_sub(&s->waiters, 1);
        if (r < 0 && err == EINTR) {
            return PP_ERR_INTERRUPT;
        }
        if (r < 0 && err == ETIMEDOUT && kind != PP_KIND_SEMAPHORE && pp_take_abandoned(s, me)) {
            *abandoned = 1;
            return PP_OK;
        }
    }
}

/* ---- SemLock ---- */

/* This process's pid, cached: getpid() is a system call and every acquire and release needs
 * the pid. Truly process-wide (a pid belongs to the process, not to a module instance), so a
 * static, reset in the child by a pthread_atfork handler installed once. */
static _Atomic uint32_t pp_cached_pid;
static pthread_once_t pp_pid_once = PTHREAD_ONCE_INIT;

static void
pp_pid_reset(void)
{
    atomic_store_explicit(&pp_cached_pid, (uint32_t)getpid(), memory_order_relaxed);
}

static void
pp_pid_init(void)
{
    pp_pid_reset();
    (void)pthread_atfork(NULL, NULL, pp_pid_reset);
}

static inline uint32_t
pp_getpid(void)
{
    return atomic_load_explicit(&pp_cached_pid, memory_order_relaxed);
}

static uint64_t
pp_tid(void)
{
    return (uint64_t)PyThread_get_thread_ident();
}

static int
pp_is_mine(SemLockObject *self)
{
    return self->kind != PP_KIND_SEMAPHORE &&
           atomic_load_explicit(&self->s->word, memory_order_relaxed) == pp_getpid() &&
           atomic_load_explicit(&self->s->owner_tid, memory_order_relaxed) == pp_tid();
}

/* SemLock(segment, offset, kind, value, maxvalue, create) */
static PyObject *
SemLock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *py_seg;
    Py_ssize_t offset;
    int kind, value, maxvalue, create;
    static char *kwlist[] = {"segment", "offset", "kind", "value", "maxvalue", "create", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oniiip:SemLock", kwlist, &py_seg, &offset, &kind,
                                     &value, &maxvalue, &create)) {
        return NULL;
    }
    if (kind < PP_KIND_LOCK || kind > PP_KIND_SEMAPHORE) {
        PyErr_SetString(PyExc_ValueError, "unrecognized kind");
        return NULL;
    }
    /* maxvalue 0 is BoundedSemaphore(0), which multiprocessing accepts (it never rises). */
    if (create && (value < 0 || maxvalue < 0 || value > maxvalue)) {
        errno = EINVAL; /* what sem_open() says to multiprocessing for these */
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    SemLockObject *self = (SemLockObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(py_seg, &self->seg_view, PyBUF_WRITABLE) < 0) {
        self->seg_view.obj = NULL;
        Py_DECREF(self);
        return NULL;
    }
    if (offset < 0 || offset % 8 != 0 ||
        offset > self->seg_view.len - (Py_ssize_t)sizeof(pp_semstate)) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_ValueError, "lock state does not fit in the segment");
        return NULL;
    }
    self->s = (pp_semstate *)((char *)self->seg_view.buf + offset);
    self->kind = kind;
    if (create) {
        self->s->maxvalue = (uint32_t)maxvalue;
        self->s->kind = (uint32_t)kind;
        atomic_store(&self->s->count, 0);
        atomic_store(&self->s->owner_tid, 0);
        atomic_store(&self->s->waiters, 0);
        /* A lock starts free (word 0); value only matters for semaphores. */
        atomic_store(&self->s->word, kind == PP_KIND_SEMAPHORE ? (uint32_t)value : 0);
    }
    else if (self->s->kind != (uint32_t)kind) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_ValueError, "lock state has another kind");
        return NULL;
    }
    return (PyObject *)self;
}

static int
SemLock_traverse(SemLockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->seg_view.obj);
    return 0;
}

static int
SemLock_clear(SemLockObject *self)
{
    if (self->seg_view.obj != NULL) {
        PyBuffer_Release(&self->seg_view);
        self->s = NULL;
    }
    return 0;
}

static void
SemLock_dealloc(SemLockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)SemLock_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
pp_semlock_ready(SemLockObject *self)
{
    if (self->s == NULL) {
        PyErr_SetString(PyExc_ValueError, "lock is released");
        return 0;
    }
    return 1;
}

/* Acquires; 1 acquired, 0 not (timeout or non-blocking), -1 error (exception set). */
static int
pp_semlock_acquire(SemLockObject *self, int block, double timeout)
{
    pp_semstate *s = self->s;
    uint32_t me = pp_getpid();
    uint64_t tid = pp_tid();
    if (self->kind == PP_KIND_RLOCK && atomic_load_explicit(&s->word, memory_order_relaxed) == me &&
        atomic_load_explicit(&s->owner_tid, memory_order_relaxed) == tid) {
        atomic_fetch_add_explicit(&s->count, 1, memory_order_relaxed);
        return 1;
    }
    int abandoned = 0;
    int got = pp_try(s, self->kind, me);
    if (!got && self->kind != PP_KIND_SEMAPHORE) {
        uint32_t owner = atomic_load(&s->word);
        if (owner != 0 && owner != me && !block) {
            got = abandoned = pp_take_abandoned(s, me);
        }
    }
    if (!got && block) {
        long long deadline = -1;
        if (timeout >= 0) {
            deadline = pp_now_ns() + (long long)(timeout * 1e9);
        }
        for (;;) {
            pp_status st;
            Py_BEGIN_ALLOW_THREADS
            st = pp_sem_wait(s, self->kind, me, deadline, &abandoned);
            Py_END_ALLOW_THREADS
            if (st == PP_OK) {
                got = 1;
                break;
            }
            if (st == PP_ERR_TIMEOUT) {
                break;
            }
            if (PyErr_CheckSignals() < 0) { /* Ctrl-C: KeyboardInterrupt propagates */
                return -1;
            }
        }
    }
    if (!got) {
        return 0;
    }
    if (self->kind != PP_KIND_SEMAPHORE) {
        atomic_store_explicit(&s->owner_tid, tid, memory_order_relaxed);
        atomic_store_explicit(&s->count, 1, memory_order_relaxed);
    }
    self->abandoned = abandoned;
    return 1;
}

PyDoc_STRVAR(SemLock_acquire_doc,
             "acquire($self, block=True, timeout=None)\n--\n\n"
             "Acquires the lock or semaphore; with a timeout (seconds), returns False when it "
             "expires. A lock whose owner died is taken over (see .abandoned).");

static PyObject *
SemLock_acquire(SemLockObject *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    int block = 1;
    PyObject *py_timeout = Py_None;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *py_block = nargs > 0 ? args[0] : NULL;
    py_timeout = nargs > 1 ? args[1] : Py_None;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k); /* borrowed */
        PyObject *val = args[nargs + k];              /* borrowed */
        if (PyUnicode_CompareWithASCIIString(key, "block") == 0 && py_block == NULL) {
            py_block = val;
        }
        else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0 && nargs < 2) {
            py_timeout = val;
        }
        else {
            PyErr_Format(PyExc_TypeError, "acquire() got an unexpected keyword argument '%U'", key);
            return NULL;
        }
    }
    if (py_block != NULL && (block = PyObject_IsTrue(py_block)) < 0) {
        return NULL;
    }
    if (!pp_semlock_ready(self)) {
        return NULL;
    }
    double timeout = -1.0;
    if (py_timeout != Py_None) {
        timeout = PyFloat_AsDouble(py_timeout);
        if (timeout == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (timeout != timeout) {
            PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
            return NULL;
        }
        if (timeout < 0) {
            timeout = 0;
        }
        if (timeout > PP_TIMEOUT_MAX) { /* beyond ~31 years: the same as waiting forever */
            timeout = -1.0;
        }
    }
    int r = pp_semlock_acquire(self, block, timeout);
    if (r < 0) {
        return NULL;
    }
    return PyBool_FromLong(r);
}

/* Releases; 0 or -1 with the exception multiprocessing raises for the same misuse. */
static int
pp_semlock_release(SemLockObject *self)
{
    pp_semstate *s = self->s;
    if (self->kind == PP_KIND_RLOCK) {
        if (!pp_is_mine(self)) {
            PyErr_SetString(PyExc_AssertionError,
                            "attempt to release recursive lock not owned by thread");
            return -1;
        }
        if (atomic_fetch_sub_explicit(&s->count, 1, memory_order_relaxed) > 1) {
            return 0;
        }
        atomic_store_explicit(&s->owner_tid, 0, memory_order_relaxed);
        atomic_exchange(&s->word, 0); /* full barrier before reading waiters */
    }
    else if (self->kind == PP_KIND_LOCK) {
        /* As with multiprocessing.Lock, any thread or process may release it. */
        atomic_store_explicit(&s->owner_tid, 0, memory_order_relaxed);
        atomic_store_explicit(&s->count, 0, memory_order_relaxed);
        if (atomic_exchange(&s->word, 0) == 0) {
            PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
            return -1;
        }
    }
    else {
        uint32_t v = atomic_load(&s->word);
        do {
            if (v >= s->maxvalue) {
                PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
                return -1;
            }
        } while (!atomic_compare_exchange_weak(&s->word, &v, v + 1));
    }
    if (atomic_load(&s->waiters) > 0) {
        pp_futex_wake(&s->word, 1);
    }
    return 0;
}

PyDoc_STRVAR(SemLock_release_doc, "release($self, /)\n--\n\nReleases the lock or semaphore.");

static PyObject *
SemLock_release(SemLockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!pp_semlock_ready(self) || pp_semlock_release(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
SemLock_enter(SemLockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!pp_semlock_ready(self)) {
        return NULL;
    }
    int r = pp_semlock_acquire(self, 1, -1.0);
    if (r < 0) {
        return NULL;
    }
    return PyBool_FromLong(r);
}

static PyObject *
SemLock_exit(SemLockObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(n))
{
    return SemLock_release(self, NULL);
}

static PyObject *
SemLock_is_mine(SemLockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!pp_semlock_ready(self)) {
        return NULL;
    }
    return PyBool_FromLong(pp_is_mine(self));
}

static PyObject *
SemLock_count(SemLockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!pp_semlock_ready(self)) {
        return NULL;
    }
    return PyLong_FromUnsignedLong(pp_is_mine(self) ? atomic_load(&self->s->count) : 0);
}

static PyObject *
SemLock_get_value(SemLockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!pp_semlock_ready(self)) {
        return NULL;
    }
    uint32_t w = atomic_load(&self->s->word);
    if (self->kind == PP_KIND_SEMAPHORE) {
        return PyLong_FromUnsignedLong(w);
    }
    return PyLong_FromLong(w == 0 ? 1 : 0);
}

static PyObject *
SemLock_is_zero(SemLockObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *py_v = SemLock_get_value(self, NULL);
    if (py_v == NULL) {
        return NULL;
    }
    int zero = PyLong_AsLong(py_v) == 0;
    Py_DECREF(py_v);
    return PyBool_FromLong(zero);
}

static PyObject *
SemLock_owner(SemLockObject *self, void *Py_UNUSED(closure))
{
    if (!pp_semlock_ready(self)) {
        return NULL;
    }
    if (self->kind == PP_KIND_SEMAPHORE) {
        Py_RETURN_NONE;
    }
    return PyLong_FromUnsignedLong(atomic_load(&self->s->word));
}

static PyObject *
SemLock_get_abandoned(SemLockObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->abandoned);
}

static PyObject *
SemLock_get_kind(SemLockObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->kind);
}

static PyObject *
SemLock_get_maxvalue(SemLockObject *self, void *Py_UNUSED(closure))
{
    if (!pp_semlock_ready(self)) {
        return NULL;
    }
    return PyLong_FromUnsignedLong(self->s->maxvalue);
}

static PyObject *
SemLock_get_segment(SemLockObject *self, void *Py_UNUSED(closure))
{
    if (self->seg_view.obj == NULL) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(self->seg_view.obj);
}

static PyObject *
SemLock_get_offset(SemLockObject *self, void *Py_UNUSED(closure))
{
    if (self->s == NULL) {
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t((char *)self->s - (char *)self->seg_view.buf);
}

/* ---- for shm.c: a synchronized value takes its lock without a Python-level call ---- */

int
pp_is_semlock(PyObject *o)
{
    PyObject *mod = PyType_GetModuleByDef(Py_TYPE(o), &pp_moduledef); /* borrowed */
    if (mod == NULL) {
        PyErr_Clear(); /* not one of ours: the caller uses the generic protocol */
        return 0;
    }
    return PyObject_TypeCheck(o, (PyTypeObject *)pp_get_state(mod)->SemLockType);
}

int
pp_lock_enter(PyObject *lock, int fast)
{
    if (fast) {
        SemLockObject *self = (SemLockObject *)lock;
        return pp_semlock_ready(self) ? pp_semlock_acquire(self, 1, -1.0) : -1;
    }
    PyObject *r = PyObject_CallMethod(lock, "__enter__", NULL);
    Py_XDECREF(r);
    return r == NULL ? -1 : 1;
}

int
pp_lock_exit(PyObject *lock, int fast)
{
    if (fast) {
        SemLockObject *self = (SemLockObject *)lock;
        return pp_semlock_ready(self) ? pp_semlock_release(self) : -1;
    }
    PyObject *r = PyObject_CallMethod(lock, "__exit__", "OOO", Py_None, Py_None, Py_None);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static PyMethodDef SemLock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))SemLock_acquire, METH_FASTCALL | METH_KEYWORDS,
     SemLock_acquire_doc},
    {"release", (PyCFunction)SemLock_release, METH_NOARGS, SemLock_release_doc},
    {"__enter__", (PyCFunction)SemLock_enter, METH_NOARGS, "Acquires the lock."},
    {"__exit__", (PyCFunction)(void (*)(void))SemLock_exit, METH_FASTCALL, "Releases the lock."},
    {"_is_mine", (PyCFunction)SemLock_is_mine, METH_NOARGS,
     "True when the calling thread holds the lock."},
    {"_count", (PyCFunction)SemLock_count, METH_NOARGS,
     "Recursion depth held by the calling thread (0 when it does not hold it)."},
    {"_get_value", (PyCFunction)SemLock_get_value, METH_NOARGS, "Current count."},
    {"_is_zero", (PyCFunction)SemLock_is_zero, METH_NOARGS, "True when the count is 0."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SemLock_getset[] = {
    {"abandoned", (getter)SemLock_get_abandoned, NULL,
     "True when the last acquire through this object took over a lock whose owner died", NULL},
    {"_owner_pid", (getter)SemLock_owner, NULL, "pid holding the lock, 0 when free", NULL},
    {"kind", (getter)SemLock_get_kind, NULL, "0 lock, 1 recursive lock, 2 semaphore", NULL},
    {"maxvalue", (getter)SemLock_get_maxvalue, NULL, "largest count", NULL},
    {"_segment", (getter)SemLock_get_segment, NULL, "the segment of the state", NULL},
    {"_offset", (getter)SemLock_get_offset, NULL, "offset of the state", NULL},
    {NULL},
};

static PyType_Slot SemLock_slots[] = {
    {Py_tp_new, SemLock_new},
    {Py_tp_dealloc, SemLock_dealloc},
    {Py_tp_traverse, SemLock_traverse},
    {Py_tp_clear, SemLock_clear},
    {Py_tp_methods, SemLock_methods},
    {Py_tp_getset, SemLock_getset},
    {Py_tp_doc, (void *)"SemLock(segment, offset, kind, value, maxvalue, create)\n--\n\n"
                        "A process-shared lock or semaphore whose state lives in a segment."},
    {0, NULL},
};

static PyType_Spec SemLock_spec = {
    .name = "pyparallel._core.SemLock",
    .basicsize = sizeof(SemLockObject),
    .flags =
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = SemLock_slots,
};

int
pp_sync_exec(PyObject *module, pp_state *st)
{
    (void)pthread_once(&pp_pid_once, pp_pid_init);
    st->SemLockType = PyType_FromModuleAndSpec(module, &SemLock_spec, NULL);
    if (st->SemLockType == NULL || PyModule_AddObjectRef(module, "SemLock", st->SemLockType) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "LOCK", PP_KIND_LOCK) < 0 ||
        PyModule_AddIntConstant(module, "RLOCK", PP_KIND_RLOCK) < 0 ||
        PyModule_AddIntConstant(module, "SEMAPHORE", PP_KIND_SEMAPHORE) < 0 ||
        PyModule_AddIntConstant(module, "SEM_VALUE_MAX", PP_SEM_VALUE_MAX) < 0 ||
        PyModule_AddIntConstant(module, "SYNC_STATE_SIZE", 64) < 0) {
        return -1;
    }
    return 0;
}
