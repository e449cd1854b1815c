/* team.c: the parallel loop every bulk kernel runs on.
 *
 * Fork safety. GNU OpenMP keeps a pool of threads per *master* thread and reuses it in the
 * next parallel region; a process forked from a thread that owns such a pool inherits the
 * pool's bookkeeping but not its threads, and deadlocks in its first parallel region. So no
 * Python thread ever becomes an OpenMP master here: every loop is handed to one long-lived
 * pthread, the team master, which owns the OpenMP pool (or, in the pthread fallback, a set
 * of helper threads). Whatever thread later calls fork() owns no pool; a pthread_atfork
 * child handler forgets the master (it does not exist in the child), and the child's first
 * loop starts a new master with a new pool. Keeping the master (instead of a thread per
 * loop) matters: new threads start on their creator's CPU and may wait a scheduler tick to
 * move to an idle one, which cost milliseconds per loop on small VMs. */
#include "pp.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
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

#define PP_MAX_HELPERS 1024
#define PP_MAX_TIDS 1024

/* The team is process-wide state by nature: the OpenMP pool it owns is per process, and the
 * atfork handler that resets it receives no argument. It holds no Python object, so it is
 * shared safely by every interpreter and module instance; this is the one mutable static. */
static struct {
    pthread_mutex_t call; /* one loop at a time */
    pthread_mutex_t mu;   /* guards the fields below */
    pthread_cond_t wake;  /* master and helpers wait here for a new generation */
    pthread_cond_t done;  /* the caller waits here for running == 0 */
    pp_loop *loop;
    unsigned long generation;
    int running;      /* threads still inside the current generation's loop */
    int participants; /* fallback: helpers 0..participants-1 take part in this generation */
    int started;      /* threads started: the master (OpenMP) or helpers (fallback) */
    unsigned long
        born; /* generation when the latest threads were started: they wait for the next */
    bool atfork_registered;
    /* OS thread ids of the team's threads (master, OpenMP workers, helpers), so that fork
     * policy can tell them from threads that could hold a lock across fork(). */
    int ntids;
    pid_t tids[PP_MAX_TIDS];
} pp_team = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
             PTHREAD_COND_INITIALIZER};

/* Records the calling thread as a team thread (once). */
static void
pp_team_note_tid(void)
{
    pid_t me = (pid_t)syscall(SYS_gettid);
    pthread_mutex_lock(&pp_team.mu);
    int known = 0;
    for (int i = 0; i < pp_team.ntids && !known; i++) {
        known = pp_team.tids[i] == me;
    }
    if (!known && pp_team.ntids < PP_MAX_TIDS) {
        pp_team.tids[pp_team.ntids++] = me;
    }
    pthread_mutex_unlock(&pp_team.mu);
}

static inline void
pp_loop_chunk(pp_loop *loop, Py_ssize_t c)
{
    Py_ssize_t lo = c * loop->chunk;
    Py_ssize_t hi = lo + loop->chunk < loop->n ? lo + loop->chunk : loop->n;
    loop->body(loop->ctx, lo, hi);
}

#ifdef PP_HAVE_OPENMP
static void
pp_loop_run(pp_loop *loop)
{
    Py_ssize_t nchunks = (loop->n + loop->chunk - 1) / loop->chunk;
#pragma omp parallel num_threads(loop->threads)
    {
        if (omp_get_thread_num() != 0) { /* the master noted itself when it started */
            pp_team_note_tid();
        }
#pragma omp for schedule(dynamic, 1)
        for (Py_ssize_t c = 0; c < nchunks; c++) {
            pp_loop_chunk(loop, c);
        }
    }
}
#else
/* One member of the pthread team: takes chunks until none are left. */
static void
pp_loop_run(pp_loop *loop)
{
    for (;;) {
        long long lo = atomic_fetch_add(&loop->next, (long long)loop->chunk);
        if (lo >= loop->n) {
            break;
        }
        pp_loop_chunk(loop, (Py_ssize_t)(lo / loop->chunk));
    }
}
#endif

/* Body of the master (OpenMP) or of helper number `(intptr_t)arg` (fallback). */
static void *
pp_team_thread(void *arg)
{
    int index = (int)(intptr_t)arg;
    pp_team_note_tid();
    pthread_mutex_lock(&pp_team.mu);
    unsigned long seen = pp_team.born;
    for (;;) {
        while (pp_team.generation == seen) {
            pthread_cond_wait(&pp_team.wake, &pp_team.mu);
        }
        seen = pp_team.generation;
        if (index >= pp_team.participants) {
            continue;
        }
        pp_loop *loop = pp_team.loop;
        pthread_mutex_unlock(&pp_team.mu);
        pp_loop_run(loop);
        pthread_mutex_lock(&pp_team.mu);
        if (--pp_team.running == 0) {
            pthread_cond_signal(&pp_team.done);
        }
    }
    return NULL;
}

/* In a forked child only the forking thread exists: forget the team's threads and any lock
 * a vanished thread held. The child's next loop starts a new team. */
static void
pp_team_atfork_child(void)
{
    pthread_mutex_init(&pp_team.call, NULL);
    pthread_mutex_init(&pp_team.mu, NULL);
    pthread_cond_init(&pp_team.wake, NULL);
    pthread_cond_init(&pp_team.done, NULL);
    pp_team.loop = NULL;
    pp_team.running = 0;
    pp_team.participants = 0;
    pp_team.started = 0;
    pp_team.born = pp_team.generation;
    pp_team.ntids = 0;
}

/* Starts team threads until `want` exist (called with pp_team.mu held); returns how many. */
static int
pp_team_grow(int want)
{
    if (!pp_team.atfork_registered) {
        if (pthread_atfork(NULL, NULL, pp_team_atfork_child) != 0) {
            return 0;
        }
        pp_team.atfork_registered = true;
    }
    pp_team.born = pp_team.generation;
    while (pp_team.started < want) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&tid, &attr, pp_team_thread, (void *)(intptr_t)pp_team.started);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            break;
        }
        pp_team.started++;
    }
    return pp_team.started;
}

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
    int want = 1; /* the master; OpenMP brings the rest */
#else
    int want = threads - 1 < PP_MAX_HELPERS ? threads - 1 : PP_MAX_HELPERS; /* + the caller */
#endif
    pthread_mutex_lock(&pp_team.call);
    pthread_mutex_lock(&pp_team.mu);
    int have = pp_team_grow(want);
    if (have == 0) { /* no thread could be started: run here */
        pthread_mutex_unlock(&pp_team.mu);
        pthread_mutex_unlock(&pp_team.call);
        body(ctx, 0, n);
        return;
    }
    pp_team.loop = &loop;
    pp_team.participants = have < want ? have : want;
    pp_team.running = pp_team.participants;
    pp_team.generation++;
    pthread_cond_broadcast(&pp_team.wake);
    pthread_mutex_unlock(&pp_team.mu);
#ifndef PP_HAVE_OPENMP
    pp_loop_run(&loop); /* the caller is a member of the pthread team */
#endif
    pthread_mutex_lock(&pp_team.mu);
    while (pp_team.running > 0) {
        pthread_cond_wait(&pp_team.done, &pp_team.mu);
    }
    pp_team.loop = NULL;
    pthread_mutex_unlock(&pp_team.mu);
    pthread_mutex_unlock(&pp_team.call);
}

PyObject *
pp_team_thread_ids(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    (void)module;
    pid_t tids[PP_MAX_TIDS];
    pthread_mutex_lock(&pp_team.mu);
    int n = pp_team.ntids;
    memcpy(tids, pp_team.tids, sizeof(pid_t) * (size_t)n);
    pthread_mutex_unlock(&pp_team.mu);
    PyObject *py_t = PyTuple_New(n);
    for (int i = 0; py_t != NULL && i < n; i++) {
        PyObject *py_id = PyLong_FromLong((long)tids[i]);
        if (py_id == NULL) {
            Py_CLEAR(py_t);
            break;
        }
        PyTuple_SET_ITEM(py_t, i, py_id); /* steals py_id */
    }
    return py_t;
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
