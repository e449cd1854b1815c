/* kernels.c: the native kernels (fib, cube_loop, square, weighted_multiply) as Kernel
 * objects with a scalar call and a bulk .map() over pp_parallel_for, and the CancelToken.
 *
 * Every entry follows the same order: convert and check all inputs with the GIL held (so bad
 * input raises the exception the Python version would, before any thread starts), release
 * the GIL around pure C, take it back, build the results.
 *
 * Inputs are held as a tuple (a copy of a list) while they are converted: conversion runs
 * Python code (__index__, __mul__, a mapping's __getitem__) that may change the list, and a
 * borrowed item of a changed list is a dangling pointer (issue 8).
 *
 * Interruption (issue 7): a caller that releases the GIL for longer than a few milliseconds
 * waits in team.c, which runs signal handlers and checks the call's CancelToken every
 * PP_TUNE_WATCH_SLICE_NS, and stops the computing threads through a flag they check. A long
 * scalar call computes on a helper thread for the same reason. A stopped call raises what
 * the signal handler raised (KeyboardInterrupt) or KernelCancelled. */
#include "pp.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_READONLY READONLY
#endif

/* ------------------------------------------------------------------------------------------
 * Kernel objects */

/* `token` is a CancelToken or NULL. */
typedef PyObject *(*pp_call_fn)(PyObject *module, PyObject *const *args, PyObject *token);
typedef PyObject *(*pp_map_fn)(PyObject *module, PyObject *const *args, int threads,
                               PyObject *token);

typedef struct {
    const char *name;
    const char *doc;
    Py_ssize_t nargs;     /* positional arguments of the scalar call */
    Py_ssize_t map_nargs; /* positional arguments of .map(), before threads= */
    pp_call_fn call;
    pp_map_fn map;
} pp_kernel_def;

typedef struct {
    PyObject_HEAD
    const pp_kernel_def *def; /* points into the constant table below */
    vectorcallfunc vectorcall;
} KernelObject;

/* ------------------------------------------------------------------------------------------
 * CancelToken: a flag that stops the kernel calls given it (cancel=token) */

typedef struct {
    PyObject_HEAD
    _Atomic int flag;
} CancelTokenObject;

static PyObject *
CancelToken_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "CancelToken() takes no arguments");
        return NULL;
    }
    CancelTokenObject *self = (CancelTokenObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        atomic_init(&self->flag, 0);
    }
    return (PyObject *)self;
}

static void
CancelToken_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *
CancelToken_cancel(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&((CancelTokenObject *)self)->flag, 1);
    Py_RETURN_NONE;
}

static PyObject *
CancelToken_get_cancelled(PyObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load(&((CancelTokenObject *)self)->flag));
}

static PyObject *
CancelToken_repr(PyObject *self)
{
    return PyUnicode_FromFormat("<pyparallel CancelToken %s>",
                                atomic_load(&((CancelTokenObject *)self)->flag) ? "cancelled"
                                                                                : "active");
}

static PyMethodDef CancelToken_methods[] = {
    {"cancel", CancelToken_cancel, METH_NOARGS,
     "cancel($self, /)\n--\n\n"
     "Stops every kernel call running with this token (within about 10 ms) and makes later\n"
     "calls with it raise KernelCancelled at once. Safe from any thread, GIL or not."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef CancelToken_getset[] = {
    {"cancelled", CancelToken_get_cancelled, NULL, "True once cancel() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot CancelToken_slots[] = {
    {Py_tp_new, CancelToken_new},
    {Py_tp_dealloc, CancelToken_dealloc},
    {Py_tp_repr, CancelToken_repr},
    {Py_tp_methods, CancelToken_methods},
    {Py_tp_getset, CancelToken_getset},
    {Py_tp_doc, (void *)"CancelToken()\n--\n\n"
                        "Pass as cancel=token to a kernel call, kernel.map() or\n"
                        "weighted_multiply_buffer(); token.cancel() stops those calls, which\n"
                        "then raise KernelCancelled. A token stays cancelled: use a new one."},
    {0, NULL},
};

static PyType_Spec CancelToken_spec = {
    .name = "pyparallel._core.CancelToken",
    .basicsize = sizeof(CancelTokenObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = CancelToken_slots,
};

/* The `cancel=` argument: NULL for None (or absent), the token itself (borrowed) when it is a
 * CancelToken; -1 with TypeError otherwise. */
static int
pp_token_arg(PyObject *module, PyObject *arg, PyObject **token)
{
    *token = NULL;
    if (arg == NULL || arg == Py_None) {
        return 0;
    }
    if (!PyObject_TypeCheck(arg, (PyTypeObject *)pp_get_state(module)->CancelTokenType)) {
        PyErr_Format(PyExc_TypeError, "cancel must be None or a CancelToken, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    *token = arg;
    return 0;
}

static const _Atomic int pp_never = 0; /* the stop flag of a call that cannot be stopped */

static inline const _Atomic int *
pp_token_flag(PyObject *token)
{
    return token != NULL ? &((CancelTokenObject *)token)->flag : &pp_never;
}

static PyObject *
pp_raise_cancelled(PyObject *module)
{
    PyErr_SetString(pp_get_state(module)->KernelCancelled, "kernel call cancelled");
    return NULL;
}

/* Sets up a watch for a call with `token` (GIL held); -1 with KernelCancelled when the token
 * is already cancelled, so that nothing starts. */
static int
pp_watch_init(PyObject *module, PyObject *token, pp_watch *w)
{
    atomic_init(&w->stop, 0);
    w->token = token != NULL ? pp_token_flag(token) : NULL;
    w->tstate = NULL;
    w->why = PP_OK;
    if (w->token != NULL && atomic_load(w->token)) {
        pp_raise_cancelled(module);
        return -1;
    }
    return 0;
}

/* After a stopped run (GIL held again): the exception for it; returns NULL. */
static PyObject *
pp_watch_fail(PyObject *module, pp_watch *w)
{
    if (w->why == PP_ERR_INTERRUPT && PyErr_Occurred()) {
        return NULL; /* what the signal handler raised */
    }
    return pp_raise_cancelled(module);
}

/* Between items of a long conversion with the GIL held: signals and the token. -1 on stop. */
static int
pp_convert_check(PyObject *module, PyObject *token, Py_ssize_t i)
{
    if ((i & (PP_TUNE_CONVERT_CHECK - 1)) != PP_TUNE_CONVERT_CHECK - 1) {
        return 0;
    }
    if (PyErr_CheckSignals() < 0) {
        return -1;
    }
    if (token != NULL && atomic_load(pp_token_flag(token))) {
        pp_raise_cancelled(module);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Shared helpers */

/* Items of `iterable` as a new tuple reference (a copy of a list, so that Python code run
 * while converting items cannot change it under us), NULL on error. */
static PyObject *
pp_fast_items(PyObject *iterable, const char *who)
{
    PyObject *py_seq = PySequence_Tuple(iterable);
    if (py_seq == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Format(PyExc_TypeError, "%s expected an iterable, got %.100s", who,
                     Py_TYPE(iterable)->tp_name);
    }
    return py_seq;
}

/* Converts `o` like operator.index() and clamps it into [lo, hi_ok]; values above hi_ok set
 * OverflowError with `overflow_msg`, values below lo become lo. Returns -1 on error. */
static int
pp_index_arg(PyObject *o, long long lo, long long hi_ok, const char *overflow_msg, long long *out)
{
    PyObject *py_idx = PyNumber_Index(o);
    if (py_idx == NULL) {
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(py_idx, &overflow);
    Py_DECREF(py_idx);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow > 0 || v > hi_ok) {
        PyErr_SetString(PyExc_OverflowError, overflow_msg);
        return -1;
    }
    *out = (overflow < 0 || v < lo) ? lo : v;
    return 0;
}

/* Index order that puts the largest `cost` first: with dynamic scheduling that is the
 * longest-processing-time rule, so one big item does not start last and run alone. */
typedef struct {
    long long key;
    Py_ssize_t index;
} pp_order_item;

static int
pp_order_cmp(const void *a, const void *b)
{
    long long ka = ((const pp_order_item *)a)->key, kb = ((const pp_order_item *)b)->key;
    return (ka < kb) - (ka > kb); /* descending */
}

/* ------------------------------------------------------------------------------------------
 * Integer kernels (fib, cube_loop): one int n in, a fixed-size C result out. Both share the
 * scalar call and the bulk map below; each supplies its conversion, computation and result. */

typedef struct {
    const char *map_name;                   /* for error messages: "fib.map()" */
    int (*conv)(PyObject *o, long long *n); /* operator.index() plus range checks */
    /* pure C, runs without the GIL; returns early (result unused) once *stop is set */
    void (*compute)(long long n, void *out, const _Atomic int *stop);
    PyObject *(*to_object)(const void *result); /* the result as a Python int */
    size_t result_size;
    long long release; /* for n below this a call is too short to release the GIL for */
    long long helper;  /* from this n a scalar call computes on a helper thread (see top) */
} pp_int_kernel;

/* One scalar computation handed to a helper thread. */
typedef struct {
    const pp_int_kernel *k;
    long long n;
    void *out;
} pp_int_task;

static void
pp_int_task_run(void *arg, const _Atomic int *stop)
{
    pp_int_task *t = arg;
    t->k->compute(t->n, t->out, stop);
}

static PyObject *
pp_int_call(PyObject *module, const pp_int_kernel *k, PyObject *arg, PyObject *token)
{
    long long n;
    uint64_t result[4]; /* large enough for every result type below */
    if (k->conv(arg, &n) < 0) {
        return NULL;
    }
    if (token != NULL && atomic_load(pp_token_flag(token))) {
        return pp_raise_cancelled(module);
    }
    if (n < k->release) {
        k->compute(n, result, &pp_never);
    }
    else if (n < k->helper) {
        /* Over in well under 100 ms: computed here, stoppable by the token only. */
        Py_BEGIN_ALLOW_THREADS
        k->compute(n, result, pp_token_flag(token));
        Py_END_ALLOW_THREADS
        if (token != NULL && atomic_load(pp_token_flag(token))) {
            return pp_raise_cancelled(module);
        }
    }
    else {
        pp_watch w;
        if (pp_watch_init(module, token, &w) < 0) {
            return NULL;
        }
        pp_int_task task = {k, n, result};
        w.tstate = PyEval_SaveThread();
        int stopped = pp_run_helper(pp_int_task_run, &task, &w);
        PyEval_RestoreThread(w.tstate);
        if (stopped) {
            return pp_watch_fail(module, &w);
        }
    }
    return k->to_object(result);
}

/* A bulk job: inputs in descending order of cost, one result slot per input position. */
typedef struct {
    const pp_int_kernel *k;
    const pp_order_item *order;
    char *out;
    const _Atomic int *stop;
} pp_int_job;

static void
pp_int_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const pp_int_job *job = (const pp_int_job *)ctx;
    for (Py_ssize_t i = lo; i < hi; i++) {
        const pp_order_item *it = &job->order[i];
        job->k->compute(it->key, job->out + (size_t)it->index * job->k->result_size, job->stop);
    }
}

static PyObject *
pp_int_map(PyObject *module, const pp_int_kernel *k, PyObject *iterable, int threads,
           PyObject *token)
{
    PyObject *py_seq = pp_fast_items(iterable, k->map_name);
    if (py_seq == NULL) {
        return NULL;
    }
    PyObject *py_list = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(py_seq);
    size_t cap = (size_t)(n > 0 ? n : 1);
    pp_order_item *order = PyMem_Malloc(sizeof(pp_order_item) * cap);
    char *out = PyMem_Malloc(k->result_size * cap);
    if (order == NULL || out == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    /* Convert and check every input before any work starts. */
    long long max_n = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* borrowed from the tuple, which holds it while conv runs Python code */
        if (k->conv(PyTuple_GET_ITEM(py_seq, i), &order[i].key) < 0 ||
            pp_convert_check(module, token, i) < 0) {
            goto error;
        }
        order[i].index = i;
        max_n = order[i].key > max_n ? order[i].key : max_n;
    }
    qsort(order, (size_t)n, sizeof(pp_order_item), pp_order_cmp);
    pp_watch w;
    if (pp_watch_init(module, token, &w) < 0) {
        goto error;
    }
    pp_int_job job = {.k = k, .order = order, .out = out, .stop = &w.stop};
    if (max_n < k->release) {
        pp_int_range(&job, 0, n);
    }
    else {
        w.tstate = PyEval_SaveThread();
        int stopped = pp_parallel_for(n, 1, threads, pp_int_range, &job, &w);
        PyEval_RestoreThread(w.tstate);
        if (stopped) {
            pp_watch_fail(module, &w);
            goto error;
        }
    }
    py_list = PyList_New(n);
    if (py_list == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *py_v = k->to_object(out + (size_t)i * k->result_size);
        if (py_v == NULL) {
            Py_CLEAR(py_list);
            goto error;
        }
        PyList_SET_ITEM(py_list, i, py_v); /* steals py_v */
    }
error:
    PyMem_Free(order);
    PyMem_Free(out);
    Py_DECREF(py_seq);
    return py_list;
}

/* ------------------------------------------------------------------------------------------
 * fib: the naive doubly recursive Fibonacci, exactly `1 if n <= 2 else fib(n-1) + fib(n-2)` */

#define PP_FIB_MAX 93 /* fib(93) is the largest that fits in 64 bits (unsigned) */

/* noipa and no sibling-call optimisation keep GCC from unrolling the recursion into itself
 * or turning one of the two calls into an accumulator loop: this is a CPU benchmark, and it
 * must make the same 2*fib(n)-1 calls as the Python version. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noipa, optimize("no-optimize-sibling-calls")))
#elif defined(__clang__)
__attribute__((noinline, disable_tail_calls))
#endif
static uint64_t
pp_fib(long long n)
{
    return n <= 2 ? 1 : pp_fib(n - 1) + pp_fib(n - 2);
}

/* The same recursion, checking the stop flag at every call above PP_TUNE_FIB_CHECK: between
 * two checks runs at most one plain subtree of fib(PP_TUNE_FIB_CHECK), a few milliseconds. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noipa, optimize("no-optimize-sibling-calls")))
#elif defined(__clang__)
__attribute__((noinline, disable_tail_calls))
#endif
static uint64_t
pp_fib_watched(long long n, const _Atomic int *stop)
{
    if (n <= PP_TUNE_FIB_CHECK) {
        return pp_fib(n);
    }
    if (atomic_load_explicit(stop, memory_order_relaxed)) {
        return 0;
    }
    return pp_fib_watched(n - 1, stop) + pp_fib_watched(n - 2, stop);
}

static void
pp_fib_compute(long long n, void *out, const _Atomic int *stop)
{
    *(uint64_t *)out = pp_fib_watched(n, stop);
}

static PyObject *
pp_fib_result(const void *result)
{
    return PyLong_FromUnsignedLongLong(*(const uint64_t *)result);
}

static int
pp_fib_arg(PyObject *o, long long *n)
{
    /* n <= 2 (however negative) gives 1, as the Python version does: clamp to 0. */
    return pp_index_arg(o, 0, PP_FIB_MAX, "fib(n) does not fit in 64 bits for n > 93", n);
}

static const pp_int_kernel pp_fib_kernel = {
    "fib.map()",      pp_fib_arg,          pp_fib_compute,     pp_fib_result,
    sizeof(uint64_t), PP_TUNE_FIB_RELEASE, PP_TUNE_FIB_HELPER,
};

static PyObject *
pp_fib_call(PyObject *module, PyObject *const *args, PyObject *token)
{
    return pp_int_call(module, &pp_fib_kernel, args[0], token);
}

static PyObject *
pp_fib_map(PyObject *module, PyObject *const *args, int threads, PyObject *token)
{
    return pp_int_map(module, &pp_fib_kernel, args[0], threads, token);
}

/* ------------------------------------------------------------------------------------------
 * cube_loop: `for i in range(n): i**3`, returning the exact sum of the cubes. The sum is
 * kept in 192 bits (a 128-bit sum plus a carry count), so it is exact for every n accepted,
 * and the carry makes the loop something the compiler has to run, not a closed form. */

#define PP_CUBE_MAX (1LL << 42) /* i**3 < 2**128 and the sum < 2**192 below this */

typedef struct {
    uint64_t w[3]; /* little-endian 64-bit limbs */
} pp_u192;

static void
pp_cube_compute(long long n, void *out, const _Atomic int *stop)
{
    unsigned __int128 lo = 0;
    uint64_t hi = 0;
    for (uint64_t start = 0; start < (uint64_t)n; start += PP_TUNE_CUBE_CHECK) {
        if (atomic_load_explicit(stop, memory_order_relaxed)) {
            break;
        }
        uint64_t end =
            (uint64_t)n - start > PP_TUNE_CUBE_CHECK ? start + PP_TUNE_CUBE_CHECK : (uint64_t)n;
        for (uint64_t i = start; i < end; i++) {
            unsigned __int128 c = (unsigned __int128)i * i * i;
            lo += c;
            hi += lo < c;
        }
    }
    pp_u192 *r = (pp_u192 *)out;
    r->w[0] = (uint64_t)lo;
    r->w[1] = (uint64_t)(lo >> 64);
    r->w[2] = hi;
}

static PyObject *
pp_cube_result(const void *result)
{
    const pp_u192 *v = (const pp_u192 *)result;
    PyObject *py_r = PyLong_FromUnsignedLongLong(v->w[2]);
    PyObject *py_shift = PyLong_FromLong(64);
    if (py_r == NULL || py_shift == NULL) {
        goto error;
    }
    for (int i = 1; i >= 0; i--) {
        PyObject *py_t = PyNumber_Lshift(py_r, py_shift);
        Py_SETREF(py_r, py_t);
        if (py_r == NULL) {
            goto error;
        }
        PyObject *py_limb = PyLong_FromUnsignedLongLong(v->w[i]);
        if (py_limb == NULL) {
            goto error;
        }
        py_t = PyNumber_Or(py_r, py_limb);
        Py_DECREF(py_limb);
        Py_SETREF(py_r, py_t);
        if (py_r == NULL) {
            goto error;
        }
    }
    Py_DECREF(py_shift);
    return py_r;
error:
    Py_XDECREF(py_r);
    Py_XDECREF(py_shift);
    return NULL;
}

static int
pp_cube_arg(PyObject *o, long long *n)
{
    /* range(n) is empty for n <= 0: clamp to 0, the sum is 0. */
    return pp_index_arg(o, 0, PP_CUBE_MAX, "cube_loop(n) supports n up to 2**42", n);
}

static const pp_int_kernel pp_cube_kernel = {
    "cube_loop.map()", pp_cube_arg,          pp_cube_compute,     pp_cube_result,
    sizeof(pp_u192),   PP_TUNE_CUBE_RELEASE, PP_TUNE_CUBE_HELPER,
};

static PyObject *
pp_cube_call(PyObject *module, PyObject *const *args, PyObject *token)
{
    return pp_int_call(module, &pp_cube_kernel, args[0], token);
}

static PyObject *
pp_cube_map(PyObject *module, PyObject *const *args, int threads, PyObject *token)
{
    return pp_int_map(module, &pp_cube_kernel, args[0], threads, token);
}

/* ------------------------------------------------------------------------------------------
 * Numbers with a C fast path: int64 or float64, anything else kept as a Python object whose
 * result Python computes (so big ints, Fractions, Decimals... give exactly Python's answer,
 * and wrong types raise Python's own TypeError). */

typedef enum { PP_NUM_OBJ = 0, PP_NUM_I64, PP_NUM_F64 } pp_num_kind;

typedef struct {
    pp_num_kind kind;
    union {
        int64_t i;
        double f;
    } v;
} pp_num;

/* Classifies `o`: exact ints that fit in int64 (and bools), exact floats; others PP_NUM_OBJ.
 * Never fails. */
static pp_num
pp_num_of(PyObject *o)
{
    pp_num r = {.kind = PP_NUM_OBJ};
    if (PyLong_CheckExact(o) || PyBool_Check(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred()) { /* not for an int or a bool, but be safe */
            PyErr_Clear();
        }
        else if (!overflow) {
            r.kind = PP_NUM_I64;
            r.v.i = v;
        }
    }
    else if (PyFloat_CheckExact(o)) {
        r.kind = PP_NUM_F64;
        r.v.f = PyFloat_AS_DOUBLE(o);
    }
    return r;
}

/* a * b in C when Python's int/float arithmetic gives the same value; returns false when the
 * product must be computed by Python (object operands or int64 overflow). */
static inline bool
pp_num_mul(pp_num a, pp_num b, pp_num *out)
{
    if (a.kind == PP_NUM_OBJ || b.kind == PP_NUM_OBJ) {
        return false;
    }
    if (a.kind == PP_NUM_I64 && b.kind == PP_NUM_I64) {
        out->kind = PP_NUM_I64;
        return !__builtin_mul_overflow(a.v.i, b.v.i, &out->v.i);
    }
    /* int * float: Python converts the int to the nearest double, as C does. */
    double x = a.kind == PP_NUM_I64 ? (double)a.v.i : a.v.f;
    double y = b.kind == PP_NUM_I64 ? (double)b.v.i : b.v.f;
    out->kind = PP_NUM_F64;
    out->v.f = x * y;
    return true;
}

static PyObject *
pp_num_to_object(pp_num v)
{
    return v.kind == PP_NUM_I64 ? PyLong_FromLongLong(v.v.i) : PyFloat_FromDouble(v.v.f);
}

/* A bulk product job: out[i] = a[i] * b[i] where both have a fast form; `ok[i]` tells. */
typedef struct {
    const pp_num *a;
    const pp_num *b;
    pp_num *out;
    unsigned char *ok;
} pp_mul_job;

static void
pp_mul_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    pp_mul_job *job = (pp_mul_job *)ctx;
    for (Py_ssize_t i = lo; i < hi; i++) {
        job->ok[i] = pp_num_mul(job->a[i], job->b[i], &job->out[i]);
    }
}

/* Chunks (PP_TUNE_MUL_CHUNK) are handed out dynamically: a helper thread that wakes late
 * (waking an idle vCPU can take milliseconds on a VM) only delays the loop by the chunk it
 * takes. Fewer than PP_TUNE_MUL_RELEASE products run on the caller, GIL held. */

/* Runs a pp_mul_job over n items: in parallel (GIL released) when big enough. -1 with an
 * exception when stopped (signal or token). */
static int
pp_mul_run(PyObject *module, pp_mul_job *job, Py_ssize_t n, int threads, PyObject *token)
{
    pp_watch w;
    if (pp_watch_init(module, token, &w) < 0) {
        return -1;
    }
    if (n < PP_TUNE_MUL_RELEASE) {
        pp_mul_range(job, 0, n);
        return 0;
    }
    w.tstate = PyEval_SaveThread();
    int stopped = pp_parallel_for(n, PP_TUNE_MUL_CHUNK, threads, pp_mul_range, job, &w);
    PyEval_RestoreThread(w.tstate);
    if (stopped) {
        pp_watch_fail(module, &w);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * square: x * x */

static PyObject *
pp_square_call(PyObject *module, PyObject *const *args, PyObject *token)
{
    if (token != NULL && atomic_load(pp_token_flag(token))) {
        return pp_raise_cancelled(module);
    }
    pp_num x = pp_num_of(args[0]), r;
    if (pp_num_mul(x, x, &r)) {
        return pp_num_to_object(r);
    }
    return PyNumber_Multiply(args[0], args[0]);
}

static PyObject *
pp_square_map(PyObject *module, PyObject *const *args, int threads, PyObject *token)
{
    PyObject *py_seq = pp_fast_items(args[0], "square.map()");
    if (py_seq == NULL) {
        return NULL;
    }
    PyObject *py_list = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(py_seq);
    size_t cap = (size_t)(n > 0 ? n : 1);
    pp_num *x = PyMem_Malloc(sizeof(pp_num) * cap);
    pp_num *out = PyMem_Malloc(sizeof(pp_num) * cap);
    unsigned char *ok = PyMem_Malloc(cap);
    if (x == NULL || out == NULL || ok == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        x[i] = pp_num_of(PyTuple_GET_ITEM(py_seq, i));
        if (pp_convert_check(module, token, i) < 0) {
            goto error;
        }
    }
    pp_mul_job job = {.a = x, .b = x, .out = out, .ok = ok};
    if (pp_mul_run(module, &job, n, threads, token) < 0) {
        goto error;
    }
    py_list = PyList_New(n);
    if (py_list == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* borrowed from the tuple: __mul__ may change the caller's list, not the tuple */
        PyObject *py_item = PyTuple_GET_ITEM(py_seq, i);
        PyObject *py_v = ok[i] ? pp_num_to_object(out[i]) : PyNumber_Multiply(py_item, py_item);
        if (py_v == NULL || pp_convert_check(module, token, i) < 0) {
            Py_XDECREF(py_v);
            Py_CLEAR(py_list);
            goto error;
        }
        PyList_SET_ITEM(py_list, i, py_v); /* steals py_v */
    }
error:
    PyMem_Free(x);
    PyMem_Free(out);
    PyMem_Free(ok);
    Py_DECREF(py_seq);
    return py_list;
}

/* ------------------------------------------------------------------------------------------
 * weighted_multiply: [(kind, number, number * weights[kind]) for kind, number in items] */

/* Unpacks a 2-item iterable like `a, b = o`, with Python's messages. New references. */
static int
pp_unpack2(PyObject *o, PyObject **a, PyObject **b)
{
    if (PyTuple_CheckExact(o) || PyList_CheckExact(o)) {
        Py_ssize_t size = PySequence_Fast_GET_SIZE(o);
        if (size != 2) {
            if (size < 2) {
                PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 2, got %zd)",
                             size);
            }
            else {
                PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 2)");
            }
            return -1;
        }
        *a = Py_NewRef(PySequence_Fast_GET_ITEM(o, 0));
        *b = Py_NewRef(PySequence_Fast_GET_ITEM(o, 1));
        return 0;
    }
    PyObject *py_it = PyObject_GetIter(o);
    if (py_it == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Format(PyExc_TypeError, "cannot unpack non-iterable %.100s object",
                         Py_TYPE(o)->tp_name);
        }
        return -1;
    }
    PyObject *py_got[3] = {NULL, NULL, NULL};
    Py_ssize_t got = 0;
    for (; got < 3; got++) {
        py_got[got] = PyIter_Next(py_it);
        if (py_got[got] == NULL) {
            break;
        }
    }
    Py_DECREF(py_it);
    if (PyErr_Occurred() || got != 2) {
        if (!PyErr_Occurred()) {
            if (got < 2) {
                PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 2, got %zd)",
                             got);
            }
            else {
                PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 2)");
            }
        }
        for (int i = 0; i < 3; i++) {
            Py_XDECREF(py_got[i]);
        }
        return -1;
    }
    *a = py_got[0];
    *b = py_got[1];
    return 0;
}

/* weights[kind] for kinds seen in the current block, by identity: a weights dict that is
 * exact and whose keys are all exact strs or ints gives the same value for the same kind
 * object as long as no Python code runs, and none runs inside a block's conversion pass
 * (such a lookup runs no Python code itself). Kept small: the usual weights have a few
 * kinds, and the items of a list share their kind objects. */
#define PP_WM_CACHE 8

typedef struct {
    PyObject *kind;   /* borrowed: alive for the block (the snapshot or the block holds it) */
    PyObject *weight; /* owned */
    pp_num num;
} pp_wm_entry;

static int
pp_wm_cacheable(PyObject *weights)
{
    if (!PyDict_CheckExact(weights) || PyDict_GET_SIZE(weights) > 64) {
        return 0;
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(weights, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k) && !PyLong_CheckExact(k)) {
            return 0;
        }
    }
    return 1;
}

/* Python code may have run: the cache is no longer valid; its weights stay alive (owned by
 * the block) until the block is built. */
#define PP_WM_FORGET()                                                                             \
    do {                                                                                           \
        for (int c_ = 0; c_ < ncache; c_++) {                                                      \
            py_owned[nowned++] = cache[c_].weight;                                                 \
        }                                                                                          \
        ncache = 0;                                                                                \
    } while (0)

static inline int
pp_atomic_exact(PyObject *o)
{
    return PyLong_CheckExact(o) || PyFloat_CheckExact(o) || PyUnicode_CheckExact(o);
}

/* Shared by the scalar call (threads == 1) and .map(). The items go by blocks: convert
 * (GIL held: unpack, weights[kind], fast forms), multiply, build the result tuples. A
 * product Python computes is made during the conversion, in the comprehension's order; the
 * others run no Python code. Errors are the comprehension's, raised at the same item.
 *
 * A list is read as the comprehension reads it, live: item i when its turn comes, while i
 * is below the list's length at that moment (Python code run by the conversion may shrink
 * or grow it, and the result is then the comprehension's). Each item read is held (a
 * reference in `owned`) until its block is built, so that kind and number, borrowed from
 * it, outlive any change to the list. No snapshot: copying a long list into a tuple, and
 * releasing that, cost a fifth of the call. Other iterables are snapshotted. */
static PyObject *
pp_weighted_multiply(PyObject *module, PyObject *items, PyObject *weights, int threads,
                     PyObject *token)
{
    if (token != NULL && atomic_load(pp_token_flag(token))) {
        return pp_raise_cancelled(module); /* before any work */
    }
    int live = PyList_CheckExact(items);
    PyObject *py_seq = live ? Py_NewRef(items) : pp_fast_items(items, "weighted_multiply()");
    if (py_seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = live ? PyList_GET_SIZE(py_seq) : PyTuple_GET_SIZE(py_seq);
    /* .map's threads: the products are the only part that could run without the GIL, and
     * they take about 1% of the call (measured: benchmarks/bench_kernels.py); waking a team
     * for them per block costs more than it saves, so every block runs on the caller. */
    (void)threads;
    Py_ssize_t block = PP_TUNE_WM_BLOCK;
    size_t cap = (size_t)(n < block ? (n > 0 ? n : 1) : block);
    int cacheable = pp_wm_cacheable(weights);
    pp_wm_entry cache[PP_WM_CACHE];
    int ncache = 0;
    Py_ssize_t nowned = 0;
    /* Per item of a block: kind, number, weight (borrowed), their fast forms, the product;
     * `owned`: the references the block took (a list's items, unpacked non-tuples' kinds and
     * numbers, uncached weights: at most 4 per item). */
    PyObject **py_refs = PyMem_Malloc(cap * 3 * sizeof(PyObject *));
    PyObject **py_owned = PyMem_Malloc(cap * 4 * sizeof(PyObject *));
    PyObject **py_prods = PyMem_Calloc(cap, sizeof(PyObject *)); /* products made by Python */
    pp_num *num = PyMem_Malloc(sizeof(pp_num) * cap);
    pp_num *wt = PyMem_Malloc(sizeof(pp_num) * cap);
    pp_num *out = PyMem_Malloc(sizeof(pp_num) * cap);
    unsigned char *ok = PyMem_Malloc(cap);
    PyObject *py_list = NULL;
    if (py_refs == NULL || py_owned == NULL || py_prods == NULL || num == NULL || wt == NULL ||
        out == NULL || ok == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    py_list = PyList_New(n);
    if (py_list == NULL) {
        goto error;
    }
    /* Neither the snapshot nor the list being filled can be part of a cycle while this
     * runs (no Python code sees them): untracked meanwhile, the cycle collector's passes
     * (one per 700 objects made) do not walk their items again and again. */
    if (py_seq != items) { /* our own copy (a tuple given is used as it is: leave it) */
        PyObject_GC_UnTrack(py_seq);
    }
    PyObject_GC_UnTrack(py_list);
    Py_ssize_t lo = 0; /* results stored: py_list's first `lo` slots, past each block */
    int ended = 0;     /* a shortened list ended the iteration, as it ends a list's */
    while (!ended) {
        Py_ssize_t size = live ? PyList_GET_SIZE(py_seq) : n;
        if (lo >= size) {
            break;
        }
        Py_ssize_t bn = size - lo < (Py_ssize_t)cap ? size - lo : (Py_ssize_t)cap;
        for (Py_ssize_t j = 0; j < bn; j++) {
            Py_ssize_t i = lo + j;
            if (live && i >= PyList_GET_SIZE(py_seq)) {
                bn = j; /* the list was shortened: the comprehension stops here too */
                ended = 1;
                break;
            }
            PyObject *it, *kind, *number, *weight = NULL;
            if (live) {
                it = Py_NewRef(PyList_GET_ITEM(py_seq, i));
                py_owned[nowned++] = it; /* held until the block is built */
            }
            else {
                it = PyTuple_GET_ITEM(py_seq, i); /* the snapshot holds it */
            }
            if (PyTuple_CheckExact(it) && PyTuple_GET_SIZE(it) == 2) {
                kind = PyTuple_GET_ITEM(it, 0); /* the tuple, held, keeps them */
                number = PyTuple_GET_ITEM(it, 1);
            }
            else {
                int r = pp_unpack2(it, &kind, &number);
                PP_WM_FORGET(); /* iterating it may have run Python code */
                if (r < 0) {
                    goto error;
                }
                py_owned[nowned++] = kind;
                py_owned[nowned++] = number;
            }
            pp_num wnum;
            if (cacheable && (PyUnicode_CheckExact(kind) || PyLong_CheckExact(kind))) {
                for (int c = 0; c < ncache; c++) {
                    if (cache[c].kind == kind) {
                        weight = cache[c].weight;
                        wnum = cache[c].num;
                        break;
                    }
                }
            }
            if (weight == NULL) {
                int pure = cacheable && (PyUnicode_CheckExact(kind) || PyLong_CheckExact(kind));
                if (!pure) {
                    PP_WM_FORGET(); /* the lookup may run Python code (hash, eq, getitem) */
                }
                weight = PyObject_GetItem(weights, kind); /* KeyError for an unknown kind */
                if (weight == NULL) {
                    goto error;
                }
                wnum = pp_num_of(weight);
                if (pure && ncache < PP_WM_CACHE) {
                    cache[ncache++] = (pp_wm_entry){kind, weight, wnum};
                }
                else {
                    py_owned[nowned++] = weight;
                }
            }
            py_refs[3 * j] = kind;
            py_refs[3 * j + 1] = number;
            py_refs[3 * j + 2] = weight;
            num[j] = pp_num_of(number);
            wt[j] = wnum;
            if (num[j].kind == PP_NUM_OBJ || wnum.kind == PP_NUM_OBJ) {
                /* Python computes this product (its __mul__ may run code that changes the
                 * weights): now, in the list comprehension's order */
                PP_WM_FORGET();
                py_prods[j] = PyNumber_Multiply(number, weight);
                if (py_prods[j] == NULL) {
                    goto error;
                }
                num[j].kind = PP_NUM_OBJ; /* not multiplied again below */
            }
        }
        /* A signal handler (or, in .map, another thread while the GIL is released) may run
         * Python code from here on: the cache is valid no longer. Its weights stay alive
         * (owned) until the block is built. */
        PP_WM_FORGET();
        if (pp_convert_check(module, token, lo + bn - 1) < 0) {
            goto error;
        }
        pp_mul_job job = {.a = num, .b = wt, .out = out, .ok = ok};
        pp_mul_range(&job, 0, bn);
        for (Py_ssize_t j = 0; j < bn; j++) {
            PyObject *kind = py_refs[3 * j], *number = py_refs[3 * j + 1];
            PyObject *py_prod;
            if (ok[j]) {
                py_prod = pp_num_to_object(out[j]);
            }
            else if (py_prods[j] != NULL) {
                py_prod = py_prods[j];
                py_prods[j] = NULL;
            }
            else { /* int64 overflow: Python's int product (no Python code: exact ints) */
                py_prod = PyNumber_Multiply(number, py_refs[3 * j + 2]);
            }
            if (py_prod == NULL) {
                goto error;
            }
            PyObject *py_t = PyTuple_New(3);
            if (py_t == NULL) {
                Py_DECREF(py_prod);
                goto error;
            }
            PyTuple_SET_ITEM(py_t, 0, Py_NewRef(kind));
            PyTuple_SET_ITEM(py_t, 1, Py_NewRef(number));
            PyTuple_SET_ITEM(py_t, 2, py_prod);
            if (pp_atomic_exact(kind) && pp_atomic_exact(number) && pp_atomic_exact(py_prod)) {
                /* holds nothing the cycle collector tracks: untracked now, as the collector
                 * itself would at its first pass over it */
                PyObject_GC_UnTrack(py_t);
            }
            if (lo + j < n) {
                PyList_SET_ITEM(py_list, lo + j, py_t); /* steals py_t */
            }
            else { /* the list grew while it was read: so does the result */
                int r = PyList_Append(py_list, py_t);
                Py_DECREF(py_t);
                if (r < 0) {
                    goto error;
                }
            }
        }
        for (Py_ssize_t k = 0; k < nowned; k++) {
            Py_DECREF(py_owned[k]);
        }
        nowned = 0;
        if (pp_convert_check(module, token, lo + bn - 1) < 0) {
            goto error;
        }
        lo += bn;
    }
    if (lo < n) { /* the list was shortened while it was read: the slots past the end are
                   * empty (NULL) */
        Py_SET_SIZE(py_list, lo);
    }
    PyObject_GC_Track(py_list);
    goto done;
error:
    Py_CLEAR(py_list);
    for (size_t j = 0; py_prods != NULL && j < cap; j++) {
        Py_XDECREF(py_prods[j]);
    }
    for (int c = 0; c < ncache; c++) {
        Py_DECREF(cache[c].weight);
    }
    for (Py_ssize_t k = 0; k < nowned; k++) {
        Py_DECREF(py_owned[k]);
    }
done:
    PyMem_Free(py_refs);
    PyMem_Free(py_owned);
    PyMem_Free(py_prods);
    PyMem_Free(num);
    PyMem_Free(wt);
    PyMem_Free(out);
    PyMem_Free(ok);
    Py_DECREF(py_seq);
    return py_list;
}

static PyObject *
pp_wm_call(PyObject *module, PyObject *const *args, PyObject *token)
{
    return pp_weighted_multiply(module, args[0], args[1], 1, token);
}

static PyObject *
pp_wm_map(PyObject *module, PyObject *const *args, int threads, PyObject *token)
{
    return pp_weighted_multiply(module, args[0], args[1], threads, token);
}

/* ------------------------------------------------------------------------------------------
 * weighted_multiply_buffer: out[i] = numbers[i] * weights[i] over int64/float64 buffers */

typedef enum { PP_BUF_I64 = 1, PP_BUF_F64 } pp_buf_kind;

/* Element type of a buffer's struct-module format, 0 with TypeError if unsupported. */
static pp_buf_kind
pp_buf_kind_of(const Py_buffer *view, const char *name)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') { /* native order: x86-64 and aarch64 are little */
        f++;
    }
    if (view->itemsize == 8 && (strcmp(f, "q") == 0 || strcmp(f, "l") == 0)) {
        return PP_BUF_I64;
    }
    if (view->itemsize == 8 && strcmp(f, "d") == 0) {
        return PP_BUF_F64;
    }
    PyErr_Format(PyExc_TypeError, "%s must be a buffer of int64 or float64, not format '%s'", name,
                 view->format ? view->format : "B");
    return 0;
}

typedef struct {
    const void *a, *b;
    void *out;
    pp_buf_kind ka, kb, kout;
} pp_buf_job;

static void
pp_buf_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const pp_buf_job *job = (const pp_buf_job *)ctx;
    if (job->kout == PP_BUF_I64) {
        const uint64_t *a = job->a, *b = job->b;
        int64_t *out = job->out;
        for (Py_ssize_t i = lo; i < hi; i++) {
            out[i] = (int64_t)(a[i] * b[i]); /* wraps on overflow, as numpy's int64 does */
        }
        return;
    }
    double *out = job->out;
    for (Py_ssize_t i = lo; i < hi; i++) {
        double x = job->ka == PP_BUF_I64 ? (double)((const int64_t *)job->a)[i]
                                         : ((const double *)job->a)[i];
        double y = job->kb == PP_BUF_I64 ? (double)((const int64_t *)job->b)[i]
                                         : ((const double *)job->b)[i];
        out[i] = x * y;
    }
}

/* When input `in` (len bytes) overlaps `out` other than exactly (same start), a copy of it
 * to read from, as numpy buffers overlapping operands: out[i] must be computed from the
 * inputs as they were before the call. *copy is NULL when no copy is needed. -1: no memory. */
static int
pp_unalias(const void *in, const void *out, Py_ssize_t len, void **copy)
{
    *copy = NULL;
    const char *i0 = in, *o0 = out;
    if (in == out || len == 0 || i0 + len <= o0 || o0 + len <= i0) {
        return 0; /* the same items (each read before it is written) or disjoint */
    }
    *copy = PyMem_Malloc((size_t)len);
    if (*copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*copy, in, (size_t)len);
    return 0;
}

PyDoc_STRVAR(pp_wmb_doc,
             "_weighted_multiply_buffer($module, numbers, weights, out, threads=None, /, *, "
             "cancel=None)\n--\n\n"
             "out[i] = numbers[i] * weights[i] over int64/float64 buffers of one length.\n"
             "`out` may overlap the inputs (the result is numpy's: computed from the inputs as\n"
             "they were). The public wrapper is pyparallel.kernels.weighted_multiply_buffer.");

static PyObject *
pp_wmb(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *py_threads = nargs == 4 ? args[3] : NULL, *py_cancel = NULL, *token;
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < 3 || nargs > 4) {
        PyErr_Format(PyExc_TypeError,
                     "_weighted_multiply_buffer() takes 3 or 4 positional arguments (%zd given)",
                     nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *py_name = PyTuple_GET_ITEM(kwnames, i); /* borrowed */
        PyObject **dst = NULL;
        if (PyUnicode_CompareWithASCIIString(py_name, "cancel") == 0) {
            dst = &py_cancel;
        }
        else if (PyUnicode_CompareWithASCIIString(py_name, "threads") == 0) {
            dst = &py_threads;
        }
        if (dst == NULL || *dst != NULL) {
            PyErr_Format(PyExc_TypeError, "_weighted_multiply_buffer() got %s argument '%S'",
                         dst == NULL ? "an unexpected keyword" : "multiple values for", py_name);
            return NULL;
        }
        *dst = args[nargs + i];
    }
    int threads = pp_threads_arg(module, py_threads);
    if (threads < 0 || pp_token_arg(module, py_cancel, &token) < 0) {
        return NULL;
    }
    Py_buffer a = {0}, b = {0}, o = {0};
    void *a_copy = NULL, *b_copy = NULL;
    PyObject *py_ret = NULL;
    if (PyObject_GetBuffer(args[0], &a, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &b, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        goto error;
    }
    if (PyObject_GetBuffer(args[2], &o, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        goto error;
    }
    pp_buf_job job = {.a = a.buf, .b = b.buf, .out = o.buf};
    if (!(job.ka = pp_buf_kind_of(&a, "numbers")) || !(job.kb = pp_buf_kind_of(&b, "weights")) ||
        !(job.kout = pp_buf_kind_of(&o, "out"))) {
        goto error;
    }
    Py_ssize_t n = a.len / 8;
    if (b.len / 8 != n || o.len / 8 != n) {
        PyErr_Format(PyExc_ValueError,
                     "numbers, weights and out must have the same length (got %zd, %zd, %zd)", n,
                     b.len / 8, o.len / 8);
        goto error;
    }
    pp_buf_kind want = (job.ka == PP_BUF_F64 || job.kb == PP_BUF_F64) ? PP_BUF_F64 : PP_BUF_I64;
    if (job.kout != want) {
        PyErr_Format(PyExc_TypeError, "out must hold %s for these inputs",
                     want == PP_BUF_F64 ? "float64" : "int64");
        goto error;
    }
    pp_watch w;
    if (pp_watch_init(module, token, &w) < 0 || pp_unalias(a.buf, o.buf, 8 * n, &a_copy) < 0 ||
        pp_unalias(b.buf, o.buf, 8 * n, &b_copy) < 0) {
        goto error;
    }
    job.a = a_copy != NULL ? a_copy : a.buf;
    job.b = b_copy != NULL ? b_copy : b.buf;
    if (n < PP_TUNE_BUF_RELEASE) {
        pp_buf_range(&job, 0, n);
    }
    else {
        w.tstate = PyEval_SaveThread();
        int stopped = pp_parallel_for(n, PP_TUNE_BUF_CHUNK, threads, pp_buf_range, &job, &w);
        PyEval_RestoreThread(w.tstate);
        if (stopped) {
            pp_watch_fail(module, &w);
            goto error;
        }
    }
    py_ret = Py_NewRef(args[2]);
error:
    PyMem_Free(a_copy);
    PyMem_Free(b_copy);
    PyBuffer_Release(&a); /* PyBuffer_Release ignores a view that was never filled */
    PyBuffer_Release(&b);
    PyBuffer_Release(&o);
    return py_ret;
}

/* ------------------------------------------------------------------------------------------
 * The kernel table and the Kernel type */

static const pp_kernel_def pp_kernel_defs[] = {
    {"fib",
     "fib(n, /, *, cancel=None)\n--\n\n"
     "The naive doubly recursive Fibonacci: 1 if n <= 2 else fib(n-1) + fib(n-2).\n"
     "Computed in C by the same recursion with the GIL released. OverflowError for n > 93.\n\n"
     "fib.map(iterable, threads=None) computes every item on a thread team.",
     1, 1, pp_fib_call, pp_fib_map},
    {"cube_loop",
     "cube_loop(n, /, *, cancel=None)\n--\n\n"
     "The CPU-burning loop `for i in range(n): i**3`, returning the exact sum of the cubes.\n"
     "Runs in C with the GIL released; 0 for n <= 0; OverflowError above 2**42.\n\n"
     "cube_loop.map(iterable, threads=None) computes every item on a thread team.",
     1, 1, pp_cube_call, pp_cube_map},
    {"square",
     "square(x, /, *, cancel=None)\n--\n\n"
     "x * x: in C for int64 and float, by Python for anything else (big ints, ...).\n\n"
     "square.map(iterable, threads=None) squares every item, in parallel for large inputs.",
     1, 1, pp_square_call, pp_square_map},
    {"weighted_multiply",
     "weighted_multiply(items, weights, /, *, cancel=None)\n--\n\n"
     "[(kind, number, number * weights[kind]) for kind, number in items].\n\n"
     "weighted_multiply.map(items, weights, threads=None) computes the products on a\n"
     "thread team.",
     2, 2, pp_wm_call, pp_wm_map},
};

#define PP_NKERNELS ((Py_ssize_t)(sizeof(pp_kernel_defs) / sizeof(pp_kernel_defs[0])))

static PyObject *
Kernel_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    const pp_kernel_def *def = ((KernelObject *)self)->def;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != def->nargs) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd positional argument%s (%zd given)",
                     def->name, def->nargs, def->nargs == 1 ? "" : "s", nargs);
        return NULL;
    }
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    PyObject *token = NULL;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        PyObject *py_name = PyTuple_GET_ITEM(kwnames, 0); /* borrowed */
        if (PyTuple_GET_SIZE(kwnames) > 1 ||
            PyUnicode_CompareWithASCIIString(py_name, "cancel") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%S'", def->name,
                         PyTuple_GET_SIZE(kwnames) > 1 ? PyTuple_GET_ITEM(kwnames, 1) : py_name);
            return NULL;
        }
        if (pp_token_arg(module, args[nargs], &token) < 0) {
            return NULL;
        }
    }
    return def->call(module, args, token);
}

/* kernel.map(*inputs, threads=None) */
static PyObject *
Kernel_map(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    const pp_kernel_def *def = ((KernelObject *)self)->def;
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    PyObject *py_threads = nargs > def->map_nargs ? args[def->map_nargs] : NULL;
    PyObject *py_cancel = NULL, *token;
    if (nargs < def->map_nargs || nargs > def->map_nargs + 1) {
        PyErr_Format(PyExc_TypeError, "%s.map() takes %zd positional argument%s (%zd given)",
                     def->name, def->map_nargs, def->map_nargs == 1 ? "" : "s", nargs);
        return NULL;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *py_name = PyTuple_GET_ITEM(kwnames, i); /* borrowed */
        PyObject **dst = NULL;
        if (PyUnicode_CompareWithASCIIString(py_name, "threads") == 0) {
            dst = &py_threads;
        }
        else if (PyUnicode_CompareWithASCIIString(py_name, "cancel") == 0) {
            dst = &py_cancel;
        }
        if (dst == NULL) {
            PyErr_Format(PyExc_TypeError, "%s.map() got an unexpected keyword argument '%S'",
                         def->name, py_name);
            return NULL;
        }
        if (*dst != NULL) {
            PyErr_Format(PyExc_TypeError, "%s.map() got multiple values for argument '%S'",
                         def->name, py_name);
            return NULL;
        }
        *dst = args[nargs + i];
    }
    int threads = pp_threads_arg(module, py_threads);
    if (threads < 0 || pp_token_arg(module, py_cancel, &token) < 0) {
        return NULL;
    }
    return def->map(module, args, threads, token);
}

static PyObject *
Kernel_reduce(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    /* Pickles by name: the receiving process looks the kernel up in its own _core. */
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    PyObject *py_lookup = PyObject_GetAttrString(module, "_kernel_by_name");
    if (py_lookup == NULL) {
        return NULL;
    }
    return Py_BuildValue("N(s)", py_lookup, ((KernelObject *)self)->def->name);
}

static PyObject *
Kernel_repr(PyObject *self)
{
    return PyUnicode_FromFormat("<pyparallel kernel %s>", ((KernelObject *)self)->def->name);
}

static PyObject *
Kernel_get_name(PyObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString(((KernelObject *)self)->def->name);
}

static PyObject *
Kernel_get_doc(PyObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString(((KernelObject *)self)->def->doc);
}

static PyObject *
Kernel_get_unary(PyObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(((KernelObject *)self)->def->nargs == 1);
}

static void
Kernel_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp); /* instances of heap types own a reference to their type */
}

static PyMethodDef Kernel_methods[] = {
    {"map", (PyCFunction)(void (*)(void))Kernel_map, METH_FASTCALL | METH_KEYWORDS,
     "map(*inputs, threads=None, cancel=None)\n--\n\n"
     "The kernel over many inputs on one thread team, GIL released; a list in input order.\n"
     "threads is capped at the number of inputs and at 4 per usable CPU (1024 at most).\n"
     "Ctrl-C stops it (KeyboardInterrupt); so does cancel=token with token.cancel()\n"
     "(KernelCancelled)."},
    {"__reduce__", Kernel_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Kernel_getset[] = {
    {"__name__", Kernel_get_name, NULL, NULL, NULL},
    {"__qualname__", Kernel_get_name, NULL, NULL, NULL},
    {"__doc__", Kernel_get_doc, NULL, NULL, NULL},
    {"unary", Kernel_get_unary, NULL, "True when kernel.map(xs) == [kernel(x) for x in xs].", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Kernel_members[] = {
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(KernelObject, vectorcall), Py_READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Kernel_slots[] = {
    {Py_tp_dealloc, Kernel_dealloc},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_repr, Kernel_repr},
    {Py_tp_methods, Kernel_methods},
    {Py_tp_getset, Kernel_getset},
    {Py_tp_members, Kernel_members},
    {0, NULL},
};

static PyType_Spec Kernel_spec = {
    .name = "pyparallel._core.Kernel",
    .basicsize = sizeof(KernelObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = Kernel_slots,
};

PyDoc_STRVAR(pp_kernel_by_name_doc, "_kernel_by_name($module, name, /)\n--\n\n"
                                    "The kernel called `name` (used to unpickle kernels).");

static PyObject *
pp_kernel_by_name(PyObject *module, PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "kernel name must be a str");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PP_NKERNELS; i++) {
        if (PyUnicode_CompareWithASCIIString(name, pp_kernel_defs[i].name) == 0) {
            return PyObject_GetAttr(module, name);
        }
    }
    PyErr_Format(PyExc_LookupError, "no kernel named %R", name);
    return NULL;
}

PyMethodDef pp_kernels_methods[] = {
    {"_kernel_by_name", pp_kernel_by_name, METH_O, pp_kernel_by_name_doc},
    {"_weighted_multiply_buffer", (PyCFunction)(void (*)(void))pp_wmb,
     METH_FASTCALL | METH_KEYWORDS, pp_wmb_doc},
    {NULL, NULL, 0, NULL},
};

int
pp_kernels_exec(PyObject *module, pp_state *st)
{
    st->KernelType = PyType_FromModuleAndSpec(module, &Kernel_spec, NULL);
    if (st->KernelType == NULL) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "Kernel", st->KernelType) < 0) {
        return -1;
    }
    st->CancelTokenType = PyType_FromModuleAndSpec(module, &CancelToken_spec, NULL);
    if (st->CancelTokenType == NULL ||
        PyModule_AddObjectRef(module, "CancelToken", st->CancelTokenType) < 0) {
        return -1;
    }
    st->KernelCancelled = PyErr_NewExceptionWithDoc(
        "pyparallel.kernels.KernelCancelled",
        "A kernel call was stopped by its CancelToken (token.cancel()).", PyExc_RuntimeError, NULL);
    if (st->KernelCancelled == NULL ||
        PyModule_AddObjectRef(module, "KernelCancelled", st->KernelCancelled) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PP_NKERNELS; i++) {
        KernelObject *k = PyObject_New(KernelObject, (PyTypeObject *)st->KernelType);
        if (k == NULL) {
            return -1;
        }
        k->def = &pp_kernel_defs[i];
        k->vectorcall = Kernel_vectorcall;
        /* PyModule_AddObject-style: steals k on success, we drop it on failure. */
        int rc = PyModule_AddObjectRef(module, pp_kernel_defs[i].name, (PyObject *)k);
        Py_DECREF(k);
        if (rc < 0) {
            return -1;
        }
    }
    return PyModule_AddFunctions(module, pp_kernels_methods);
}
