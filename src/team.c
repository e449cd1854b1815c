/* team.c: the parallel loop every bulk kernel runs on.
 *
 * Fork safety. GNU OpenMP keeps a pool of threads per *master* thread and reuses it in the
 * next parallel region; a process forked from a thread that owns such a pool inherits the
 * pool's bookkeeping but not its threads, and deadlocks in its first parallel region. So no
 * Python thread ever becomes an OpenMP master here: each parallel loop is started from a
 * short-lived pthread which owns the team and takes it down when it exits. Whatever thread
 * later calls fork() has no pool, and the child can run OpenMP (or this loop) at once. The
 * cost is one thread start and one team start per bulk call (tens of microseconds), which
 * is why small inputs run serially on the caller. The pthread fallback has the same shape. */
#include "pp.h"

#include <pthread.h>
#include <stdatomic.h>
#ifdef PP_HAVE_OPENMP
#include <omp.h>
#endif

typedef struct {
    Py_ssize_t n;
    Py_ssize_t chunk;
    int threads;
    pp_range_fn body;
    void *ctx;
    atomic_llong next; /* first index of the next chunk to hand out (pthread fallback) */
} pp_loop;

static inline void
pp_loop_chunk(pp_loop *loop, Py_ssize_t c)
{
    Py_ssize_t lo = c * loop->chunk;
    Py_ssize_t hi = lo + loop->chunk < loop->n ? lo + loop->chunk : loop->n;
    loop->body(loop->ctx, lo, hi);
}

#ifdef PP_HAVE_OPENMP
/* The master of one OpenMP team; runs on its own pthread (see the file comment). */
static void *
pp_loop_master(void *arg)
{
    pp_loop *loop = (pp_loop *)arg;
    Py_ssize_t nchunks = (loop->n + loop->chunk - 1) / loop->chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(loop->threads)
    for (Py_ssize_t c = 0; c < nchunks; c++) {
        pp_loop_chunk(loop, c);
    }
    return NULL;
}
#else
/* One member of the pthread team: takes chunks until none are left. */
static void *
pp_loop_master(void *arg)
{
    pp_loop *loop = (pp_loop *)arg;
    for (;;) {
        long long lo = atomic_fetch_add(&loop->next, (long long)loop->chunk);
        if (lo >= loop->n) {
            break;
        }
        pp_loop_chunk(loop, (Py_ssize_t)(lo / loop->chunk));
    }
    return NULL;
}
#endif

void
pp_parallel_for(Py_ssize_t n, Py_ssize_t chunk, int threads, pp_range_fn body, void *ctx)
{
    if (n <= 0) {
        return;
    }
    if (chunk < 1) {
        chunk = 1;
    }
    Py_ssize_t nchunks = (n + chunk - 1) / chunk;
    if (threads > nchunks) {
        threads = (int)nchunks;
    }
    if (threads <= 1) {
        body(ctx, 0, n);
        return;
    }
    pp_loop loop = {.n = n, .chunk = chunk, .threads = threads, .body = body, .ctx = ctx};
    atomic_init(&loop.next, 0);
#ifdef PP_HAVE_OPENMP
    pthread_t master;
    if (pthread_create(&master, NULL, pp_loop_master, &loop) != 0) {
        body(ctx, 0, n);
        return;
    }
    pthread_join(master, NULL);
#else
    /* threads - 1 helpers plus the calling thread; helpers that fail to start are skipped. */
    pthread_t *tids = (pthread_t *)PyMem_RawMalloc(sizeof(pthread_t) * (size_t)threads);
    int started = 0;
    if (tids != NULL) {
        for (int t = 0; t < threads - 1; t++) {
            if (pthread_create(&tids[started], NULL, pp_loop_master, &loop) == 0) {
                started++;
            }
        }
    }
    pp_loop_master(&loop);
    for (int t = 0; t < started; t++) {
        pthread_join(tids[t], NULL);
    }
    PyMem_RawFree(tids);
#endif
}

int
pp_threads_arg(PyObject *module, PyObject *arg)
{
    if (arg == NULL || arg == Py_None) {
        int t = pp_get_state(module)->default_threads;
        return t > 0 ? t : 1;
    }
    if (!PyLong_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "threads must be None or a positive int, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    long t = PyLong_AsLong(arg);
    if (t == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (t < 1) {
        PyErr_SetString(PyExc_ValueError, "threads must be at least 1");
        return -1;
    }
    return t > 4096 ? 4096 : (int)t;
}
