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
 * move to an idle one, which cost milliseconds per loop on small VMs.
 *
 * Before a fork (pthread_atfork prepare), an idle team is taken down: its threads are joined
 * and the OpenMP workers they own have exited, so the forking process counts no thread of
 * ours (Python 3.12+ warns "This process is multi-threaded, use of fork() may lead to
 * deadlocks" when it counts any; issue 7). The next loop, in parent or child, starts a new
 * team. A team busy in a loop at fork time is left alone (it is then really running).
 *
 * Interruption. The caller of a loop does not take part in it: it waits, waking every
 * PP_WATCH_SLICE_NS to run pp_watch_poll() (signal handlers, a CancelToken), and on a stop
 * request sets a flag that the loop's threads check between chunks (and long bodies inside
 * their computation), then waits for them to leave. */
#define _GNU_SOURCE /* pthread_timedjoin_np, CPU_COUNT */
#include "pp.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
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
    const _Atomic int *stop; /* set when the loop must end early: no new chunk starts */
    atomic_llong next;       /* first index of the next chunk to hand out (pthread fallback) */
} pp_loop;

#define PP_MAX_HELPERS PP_TUNE_MAX_THREADS_ABS
#define PP_MAX_TIDS 1024

/* The team is process-wide state by nature: the OpenMP pool it owns is per process, and the
 * atfork handlers that reset it receive no argument. It holds no Python object, so it is
 * shared safely by every interpreter and module instance; this is the one mutable static. */
static struct {
    pthread_mutex_t call; /* one loop at a time */
    pthread_mutex_t mu;   /* guards the fields below */
    pthread_cond_t wake;  /* master and helpers wait here for a new generation */
    pthread_cond_t done;  /* the caller waits here for running == 0 */
    pp_loop *loop;
    unsigned long generation;
    int running;      /* threads still inside the current generation's loop */
    int participants; /* helpers 0..participants-1 take part in this generation */
    int started;      /* threads started: the master (OpenMP) or helpers (fallback) */
    unsigned long
        born;  /* generation when the latest threads were started: they wait for the next */
    bool quit; /* the threads leave at the next generation (before a fork) */
    _Atomic unsigned long owner; /* pthread_self() of the caller holding `call`, 0 if none */
    bool prepare_locked;         /* the atfork prepare handler holds `call` */
    bool atfork_registered;      /* guarded by `call` */
    /* OS thread ids of the team's threads (master, OpenMP workers, helpers), so that fork
     * policy can tell them from threads that could hold a lock across fork(). */
    int ntids;
    pid_t tids[PP_MAX_TIDS];
    pthread_t handles[PP_MAX_HELPERS]; /* the threads started here (joinable) */
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
    if (atomic_load_explicit(loop->stop, memory_order_relaxed)) {
        return; /* stopped: the remaining chunks are skipped */
    }
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
        if (pp_team.quit) {
            break;
        }
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
    pthread_mutex_unlock(&pp_team.mu);
    return NULL; /* OpenMP: the thread's pool is freed at its exit, its workers leave too */
}

/* True while OS thread `tid` of this process still exists (it is counted by the kernel until
 * it is reaped, a little after pthread_join returns or a detached thread ends). */
static bool
pp_tid_alive(pid_t tid)
{
    return syscall(SYS_tgkill, getpid(), tid, 0) == 0 || errno != ESRCH;
}

/* Takes the team down (with `call` held and no loop running): the threads are joined, and
 * the OpenMP workers (detached, owned by the master) waited for, for up to 1 s. */
static void
pp_team_stop(void)
{
    pthread_mutex_lock(&pp_team.mu);
    int n = pp_team.started;
    if (n == 0) {
        pthread_mutex_unlock(&pp_team.mu);
        return;
    }
    pp_team.quit = true;
    pp_team.generation++;
    pthread_cond_broadcast(&pp_team.wake);
    pthread_mutex_unlock(&pp_team.mu);
    for (int i = 0; i < n; i++) {
        pthread_join(pp_team.handles[i], NULL);
    }
    pthread_mutex_lock(&pp_team.mu);
    for (int spins = 0; spins < 10000; spins++) {
        bool any = false;
        for (int i = 0; i < pp_team.ntids && !any; i++) {
            any = pp_tid_alive(pp_team.tids[i]);
        }
        if (!any) {
            break;
        }
        struct timespec ts = {0, 100000}; /* 0.1 ms */
        nanosleep(&ts, NULL);
    }
    pp_team.quit = false;
    pp_team.started = 0;
    pp_team.participants = 0;
    pp_team.ntids = 0;
    pp_team.born = pp_team.generation;
    pthread_mutex_unlock(&pp_team.mu);
}

/* Before fork(): an idle team is taken down (see the top of the file); a busy one is left. */
static void
pp_team_atfork_prepare(void)
{
    if (pthread_mutex_trylock(&pp_team.call) != 0) {
        return;
    }
    pp_team.prepare_locked = true;
    pp_team_stop();
}

static void
pp_team_atfork_parent(void)
{
    if (pp_team.prepare_locked) {
        pp_team.prepare_locked = false;
        pthread_mutex_unlock(&pp_team.call);
    }
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
    pp_team.quit = false;
    pp_team.prepare_locked = false;
    atomic_store(&pp_team.owner, 0);
    pp_team.born = pp_team.generation;
    pp_team.ntids = 0;
}

/* Starts team threads until `want` exist (called with `call` and pp_team.mu held); returns
 * how many there are. */
static int
pp_team_grow(int want)
{
    if (!pp_team.atfork_registered) {
        if (pthread_atfork(pp_team_atfork_prepare, pp_team_atfork_parent, pp_team_atfork_child) !=
            0) {
            return 0;
        }
        pp_team.atfork_registered = true;
    }
    pp_team.born = pp_team.generation;
    while (pp_team.started < want) {
        pthread_t tid;
        int rc = pthread_create(&tid, NULL, pp_team_thread, (void *)(intptr_t)pp_team.started);
        if (rc != 0) {
            break;
        }
        pp_team.handles[pp_team.started++] = tid;
    }
    return pp_team.started;
}

/* Waits on `cond` (with `mu` held) for up to one watch slice; true when the slice ended. */
static bool
pp_timed_wait(pthread_cond_t *cond, pthread_mutex_t *mu)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ns = ts.tv_nsec + PP_TUNE_WATCH_SLICE_NS;
    ts.tv_sec += ns / 1000000000LL;
    ts.tv_nsec = ns % 1000000000LL;
    return pthread_cond_timedwait(cond, mu, &ts) == ETIMEDOUT;
}

/* Takes the one-loop-at-a-time lock, polling `w` while another loop holds it; false when
 * the watch said stop first. */
static bool
pp_call_lock(pp_watch *w)
{
    bool got = false;
    if (w == NULL) {
        pthread_mutex_lock(&pp_team.call);
        got = true;
    }
    while (!got) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long ns = ts.tv_nsec + PP_TUNE_WATCH_SLICE_NS;
        ts.tv_sec += ns / 1000000000LL;
        ts.tv_nsec = ns % 1000000000LL;
        if (pthread_mutex_timedlock(&pp_team.call, &ts) == 0) {
            got = true;
            break;
        }
        if (pp_watch_poll(w)) {
            return false;
        }
    }
    atomic_store(&pp_team.owner, (unsigned long)pthread_self());
    return got;
}

static void
pp_call_unlock(void)
{
    atomic_store(&pp_team.owner, 0);
    pthread_mutex_unlock(&pp_team.call);
}

int
pp_parallel_for(Py_ssize_t n, Py_ssize_t chunk, int threads, pp_range_fn body, void *ctx,
                pp_watch *w)
{
    static const _Atomic int never = 0;
    if (n <= 0) {
        return 0;
    }
    if (chunk < 1) {
        chunk = 1;
    }
    Py_ssize_t nchunks = (n + chunk - 1) / chunk;
    if (threads > nchunks) {
        threads = (int)nchunks;
    }
    if (threads <= 1 && w == NULL) {
        body(ctx, 0, n);
        return 0;
    }
    pp_loop loop = {.n = n,
                    .chunk = chunk,
                    .threads = threads < 1 ? 1 : threads,
                    .body = body,
                    .ctx = ctx,
                    .stop = w != NULL ? &w->stop : &never};
    atomic_init(&loop.next, 0);
#ifdef PP_HAVE_OPENMP
    int want = 1; /* the master; OpenMP brings the rest */
#else
    int want = loop.threads < PP_MAX_HELPERS ? loop.threads : PP_MAX_HELPERS;
#endif
    if (atomic_load(&pp_team.owner) == (unsigned long)pthread_self()) {
        /* Re-entered from Python code that pp_watch_poll ran on this thread (a signal handler,
         * a finalizer run by the GC) while this thread's loop holds the team: run here. */
        for (Py_ssize_t c = 0; c < nchunks; c++) {
            pp_loop_chunk(&loop, c);
        }
        return w != NULL && atomic_load(&w->stop);
    }
    if (!pp_call_lock(w)) {
        return 1;
    }
    pthread_mutex_lock(&pp_team.mu);
    int have = pp_team_grow(want);
    if (have == 0) { /* no thread could be started: run here (uninterruptibly) */
        pthread_mutex_unlock(&pp_team.mu);
        pp_call_unlock();
        for (Py_ssize_t c = 0; c < nchunks; c++) {
            pp_loop_chunk(&loop, c);
        }
        return w != NULL && atomic_load(&w->stop);
    }
    pp_team.loop = &loop;
    pp_team.participants = have < want ? have : want;
    pp_team.running = pp_team.participants;
    pp_team.generation++;
    pthread_cond_broadcast(&pp_team.wake);
    bool polling = w != NULL;
    while (pp_team.running > 0) {
        if (!polling) {
            pthread_cond_wait(&pp_team.done, &pp_team.mu);
        }
        else if (pp_timed_wait(&pp_team.done, &pp_team.mu) && pp_team.running > 0) {
            pthread_mutex_unlock(&pp_team.mu);
            polling = !pp_watch_poll(w); /* a stop request ends the polling; wait for the team */
            pthread_mutex_lock(&pp_team.mu);
        }
    }
    pp_team.loop = NULL;
    pthread_mutex_unlock(&pp_team.mu);
    pp_call_unlock();
    return w != NULL && atomic_load(&w->stop);
}

int
pp_watch_poll(pp_watch *w)
{
    if (atomic_load(&w->stop)) {
        return 1;
    }
    if (w->token != NULL && atomic_load(w->token)) {
        w->why = PP_ERR_CANCELLED;
        atomic_store(&w->stop, 1);
        return 1;
    }
    /* Signal handlers run on the main thread only; elsewhere PyErr_CheckSignals() returns 0 at
     * once. Taking the GIL every slice costs the other threads nothing measurable. */
    PyEval_RestoreThread(w->tstate);
    int r = PyErr_CheckSignals(); /* on error the exception stays set for the caller */
    w->tstate = PyEval_SaveThread();
    if (r < 0) {
        w->why = PP_ERR_INTERRUPT;
        atomic_store(&w->stop, 1);
        return 1;
    }
    return 0;
}

/* A helper thread for one long scalar computation (see pp_run_helper). */
typedef struct {
    void (*fn)(void *arg, const _Atomic int *stop);
    void *arg;
    const _Atomic int *stop;
} pp_helper;

static void *
pp_helper_main(void *p)
{
    pp_helper *h = p;
    h->fn(h->arg, h->stop);
    return NULL;
}

int
pp_run_helper(void (*fn)(void *arg, const _Atomic int *stop), void *arg, pp_watch *w)
{
    pp_helper h = {fn, arg, &w->stop};
    pthread_t tid;
    if (pthread_create(&tid, NULL, pp_helper_main, &h) != 0) {
        fn(arg, &w->stop); /* no thread: compute here (a CancelToken set earlier still counts) */
        return atomic_load(&w->stop);
    }
    bool polling = true;
    for (;;) {
        if (!polling) {
            pthread_join(tid, NULL);
            break;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long ns = ts.tv_nsec + PP_TUNE_WATCH_SLICE_NS;
        ts.tv_sec += ns / 1000000000LL;
        ts.tv_nsec = ns % 1000000000LL;
        if (pthread_timedjoin_np(tid, NULL, &ts) == 0) {
            break;
        }
        polling = !pp_watch_poll(w);
    }
    return atomic_load(&w->stop);
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

/* The most threads a loop gets: PP_TUNE_THREADS_PER_CPU per CPU this process may run on,
 * never more than PP_TUNE_MAX_THREADS_ABS (threads beyond the CPUs only add switching). */
static int
pp_max_threads(void)
{
    cpu_set_t set;
    int cpus = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        cpus = CPU_COUNT(&set);
    }
    if (cpus < 1) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        cpus = n > 0 ? (int)n : 1;
    }
    long long m = (long long)cpus * PP_TUNE_THREADS_PER_CPU;
    return m > PP_TUNE_MAX_THREADS_ABS ? PP_TUNE_MAX_THREADS_ABS : (int)m;
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
    int overflow = 0;
    long long t = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (t == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow < 0 || (overflow == 0 && t < 1)) {
        PyErr_SetString(PyExc_ValueError, "threads must be at least 1");
        return -1;
    }
    if (overflow > 0 || t > PP_TUNE_THREADS_PER_CPU) { /* only then is the cap worth a syscall */
        int cap = pp_max_threads();
        if (overflow > 0 || t > cap) {
            return cap;
        }
    }
    return (int)t;
}
