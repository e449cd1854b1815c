/* channel.c: the shared-memory transport between a Pool's parent and its workers.
 * (The parent's put/get/reset are called by one thread at a time, under the pool's lock;
 * wait/spin/notify touch only atomics and the pipe and may run beside them.)
 *
 * One memfd region (nothing in /dev/shm) holds, per worker slot, a task ring (parent ->
 * worker) and a result ring (worker -> parent). Each ring has exactly one producer and one
 * consumer, so a worker that dies can corrupt nothing but its own slot, which the parent
 * resets before the slot's next worker starts. A ring is a byte stream: a message is an 8-byte
 * length followed by its bytes, streamed through the ring in as many pieces as needed, so a
 * message of any size fits a ring of any size.
 *
 * Waiting: a worker sleeps on a futex word of its ring; the parent's collector thread sleeps
 * in poll() on a pipe (workers write one byte when the parent said it is asleep) plus the
 * workers' sentinels, so a death wakes it just like a result does. The shared region holds
 * offsets and C11 atomics only, never pointers. */
#define _GNU_SOURCE
#include "pp.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PP_CHAN_MAGIC 0x70706368616e3031ULL /* "ppchan01" */
/* Times and sizes: PP_TUNE_* in pp.h. */

/* One direction between the parent and one worker. Counters only grow; offset = count % cap. */
typedef struct {
    _Atomic uint64_t head; /* bytes written, by the producer */
    char pad0[56];
    _Atomic uint64_t tail; /* bytes read, by the consumer */
    char pad1[56];
    _Atomic uint32_t data_seq;  /* futex word: bumped by the producer after a write */
    _Atomic uint32_t cons_wait; /* the consumer sleeps (or is about to) on data_seq */
    _Atomic uint32_t space_seq; /* futex word: bumped by the consumer after a read */
    _Atomic uint32_t prod_wait; /* the producer waits for space */
    char pad2[48];
} pp_ring;

typedef struct {
    uint64_t magic;
    uint32_t nslots;
    uint32_t reserved;
    uint64_t task_cap;
    uint64_t result_cap;
    uint64_t slot_size;
    _Atomic uint32_t parent_waiting; /* the collector is (about to be) asleep in poll() */
    char pad[20];
} pp_chan_hdr;

/* Partial read of a result message, kept by the parent between get() calls. */
typedef struct {
    unsigned char hdr[8];
    int hdr_got;
    PyObject *buf; /* bytearray being filled, or NULL */
    uint64_t got;
} pp_partial;

typedef struct {
    PyObject_HEAD
    char *base; /* mapping of the whole region */
    size_t size;
    int fd;                        /* the memfd */
    int rfd;                       /* parent: read end of the wake pipe */
    int wfd;                       /* write end of the wake pipe (parent: both ends) */
    int owner;                     /* 1 in the parent that created it */
    pid_t peer;                    /* worker: the parent's pid, to notice its death */
    unsigned long long peer_start; /* worker: the parent's start time, against pid reuse */
    pp_partial *partial;           /* parent: one per slot */
    _Atomic int64_t lease_until;   /* parent: callers collect results themselves until then */
    pp_spin_gate gate;             /* parent: callers' spin(); worker: recv()'s spin */
    int busy;    /* calls in progress that may release the GIL while using the mapping */
    int closing; /* close() came during such a call: the last one to finish releases */
} ChannelObject;

static void pp_channel_release(ChannelObject *ch);

/* ---- GIL-free helpers ---- */

/* Polls `ready(arg)` for up to ns nanoseconds: a sleep and a wakeup cost tens of
 * microseconds on a busy or virtual machine, more than a short task takes. */
static int
pp_spin(int (*ready)(void *), void *arg, int64_t ns)
{
    if (ready(arg)) {
        return 1;
    }
    int64_t end = pp_now_ns() + ns;
    for (unsigned i = 1;; i++) {
        pp_cpu_relax();
        if (ready(arg)) {
            return 1;
        }
        if ((i & 63) == 0 && pp_now_ns() >= end) {
            return 0;
        }
    }
}

static int
pp_ring_has_data(void *arg)
{
    pp_ring *r = arg;
    return atomic_load_explicit(&r->head, memory_order_acquire) !=
           atomic_load_explicit(&r->tail, memory_order_relaxed);
}

static inline pp_chan_hdr *
pp_hdr(ChannelObject *ch)
{
    return (pp_chan_hdr *)ch->base;
}

static inline pp_ring *
pp_task_ring(ChannelObject *ch, uint32_t slot)
{
    return (pp_ring *)(ch->base + sizeof(pp_chan_hdr) + slot * pp_hdr(ch)->slot_size);
}

static inline pp_ring *
pp_result_ring(ChannelObject *ch, uint32_t slot)
{
    return pp_task_ring(ch, slot) + 1;
}

static inline char *
pp_task_data(ChannelObject *ch, uint32_t slot)
{
    return (char *)(pp_task_ring(ch, slot) + 2);
}

static inline char *
pp_result_data(ChannelObject *ch, uint32_t slot)
{
    return pp_task_data(ch, slot) + pp_hdr(ch)->task_cap;
}

/* Copies up to n bytes into the ring; returns how many fit. Never blocks. */
static size_t
pp_ring_write(pp_ring *r, char *data, uint64_t cap, const char *src, size_t n)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    uint64_t space = cap - (head - tail);
    if (n > space) {
        n = (size_t)space;
    }
    if (n == 0) {
        return 0;
    }
    uint64_t off = head % cap;
    size_t first = (size_t)(cap - off) < n ? (size_t)(cap - off) : n;
    memcpy(data + off, src, first);
    memcpy(data, src + first, n - first);
    atomic_store_explicit(&r->head, head + n, memory_order_seq_cst);
    return n;
}

/* Copies up to n bytes out of the ring; returns how many were there. Never blocks. */
static size_t
pp_ring_read(pp_ring *r, const char *data, uint64_t cap, char *dst, size_t n)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&r->head, memory_order_acquire);
    uint64_t avail = head - tail;
    if (n > avail) {
        n = (size_t)avail;
    }
    if (n == 0) {
        return 0;
    }
    uint64_t off = tail % cap;
    size_t first = (size_t)(cap - off) < n ? (size_t)(cap - off) : n;
    memcpy(dst, data + off, first);
    memcpy(dst + first, data, n - first);
    atomic_store_explicit(&r->tail, tail + n, memory_order_seq_cst);
    return n;
}

/* Tells the parent's collector to look (a byte on the wake pipe), if it sleeps. */
static void
pp_wake_parent(ChannelObject *ch)
{
    if (atomic_exchange(&pp_hdr(ch)->parent_waiting, 0)) {
        char b = 1;
        ssize_t rc;
        do {
            rc = write(ch->wfd, &b, 1); /* EAGAIN: the pipe is full, the parent wakes anyway */
        } while (rc < 0 && errno == EINTR);
    }
}

/* After the producer wrote: wake a sleeping consumer. */
static void
pp_ring_signal_data(pp_ring *r)
{
    atomic_fetch_add(&r->data_seq, 1);
    if (atomic_load(&r->cons_wait)) {
        pp_futex_wake(&r->data_seq, 1);
    }
}

/* After the consumer read: wake a producer waiting for space. */
static void
pp_ring_signal_space(pp_ring *r)
{
    atomic_fetch_add(&r->space_seq, 1);
    if (atomic_load(&r->prod_wait)) {
        pp_futex_wake(&r->space_seq, 1);
    }
}

/* Worker side: sleeps up to one slice until the ring has data (want_data) or space. */
static pp_status
pp_ring_wait(pp_ring *r, uint64_t cap, int want_data)
{
    _Atomic uint32_t *flag = want_data ? &r->cons_wait : &r->prod_wait;
    _Atomic uint32_t *word = want_data ? &r->data_seq : &r->space_seq;
    atomic_store(flag, 1);
    uint32_t seq = atomic_load(word);
    uint64_t used = atomic_load(&r->head) - atomic_load(&r->tail);
    int ready = want_data ? used > 0 : used < cap;
    pp_status st = PP_OK;
    if (!ready && pp_futex_wait(word, seq, PP_TUNE_WAIT_SLICE_MS * 1000000LL) < 0) {
        if (errno == ETIMEDOUT) {
            st = PP_ERR_TIMEOUT;
        }
        else if (errno == EINTR) {
            st = PP_ERR_INTERRUPT;
        }
    }
    if (want_data) {
        atomic_store(flag, 0);
    }
    return st;
}

/* ---- Python-facing helpers ---- */

/* Between slices of a blocking worker-side wait: run signal handlers, notice a dead parent
 * (gone, a zombie nobody reaped yet, or its pid reused by another process). */
static int
pp_worker_check(ChannelObject *ch)
{
    if (PyErr_CheckSignals() < 0) {
        return -1;
    }
    if (ch->peer > 0) {
        char state;
        unsigned long long start;
        if (pp_proc_stat(ch->peer, &state, &start) < 0 || state == 'Z' || state == 'X' ||
            start != ch->peer_start) {
            PyErr_SetString(PyExc_BrokenPipeError, "pyparallel: the pool's parent process exited");
            return -1;
        }
    }
    return 0;
}

static int
pp_check_slot(ChannelObject *ch, long slot)
{
    if (ch->base == NULL || ch->closing) {
        PyErr_SetString(PyExc_ValueError, "channel is closed");
        return -1;
    }
    if (slot < 0 || (uint64_t)slot >= pp_hdr(ch)->nslots) {
        PyErr_SetString(PyExc_IndexError, "channel slot out of range");
        return -1;
    }
    return 0;
}

static ChannelObject *
pp_channel_alloc(PyTypeObject *type)
{
    ChannelObject *ch = (ChannelObject *)type->tp_alloc(type, 0);
    if (ch == NULL) {
        return NULL;
    }
    ch->fd = ch->rfd = ch->wfd = -1;
    return ch;
}

static int
pp_map_fd(ChannelObject *ch, size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, ch->fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    ch->base = p;
    ch->size = size;
    return 0;
}

/* Channel(nslots, task_bytes, result_bytes): a new region, owned by the calling process. */
static PyObject *
Channel_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned int nslots;
    unsigned long long task_cap, result_cap;
    static char *kwlist[] = {"nslots", "task_bytes", "result_bytes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "IKK:Channel", kwlist, &nslots, &task_cap,
                                     &result_cap)) {
        return NULL;
    }
    if (nslots == 0 || task_cap < 64 || result_cap < 64) {
        PyErr_SetString(PyExc_ValueError, "Channel needs nslots >= 1 and rings of 64+ bytes");
        return NULL;
    }
    task_cap = (task_cap + 63) & ~63ULL;
    result_cap = (result_cap + 63) & ~63ULL;
    uint64_t slot_size = 2 * sizeof(pp_ring) + task_cap + result_cap;
    size_t size = sizeof(pp_chan_hdr) + (size_t)(nslots * slot_size);
    int pipefd[2];
    ChannelObject *ch = pp_channel_alloc(type);
    if (ch == NULL) {
        return NULL;
    }
    ch->owner = 1;
    ch->partial = PyMem_Calloc(nslots, sizeof(pp_partial));
    if (ch->partial == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    ch->fd = memfd_create("pyparallel-channel", MFD_CLOEXEC);
    if (ch->fd < 0 || ftruncate(ch->fd, (off_t)size) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    if (pipe2(pipefd, O_CLOEXEC | O_NONBLOCK) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    ch->rfd = pipefd[0];
    ch->wfd = pipefd[1];
    if (pp_map_fd(ch, size) < 0) {
        goto error;
    }
    pp_chan_hdr *h = pp_hdr(ch);
    h->magic = PP_CHAN_MAGIC;
    h->nslots = nslots;
    h->task_cap = task_cap;
    h->result_cap = result_cap;
    h->slot_size = slot_size;
    return (PyObject *)ch;
error:
    Py_DECREF(ch);
    return NULL;
}

/* Channel.attach(pid, fd, pipe_rfd): a worker's view of the parent's channel, through
 * /proc/<pid>/fd, which works the same under fork, forkserver and spawn. */
static PyObject *
Channel_attach(PyObject *cls, PyObject *args)
{
    int pid, fd, rfd;
    char path[64];
    struct stat sb;
    if (!PyArg_ParseTuple(args, "iii:attach", &pid, &fd, &rfd)) {
        return NULL;
    }
    ChannelObject *ch = pp_channel_alloc((PyTypeObject *)cls);
    if (ch == NULL) {
        return NULL;
    }
    char state;
    if (pp_proc_stat(pid, &state, &ch->peer_start) < 0) {
        errno = ESRCH;
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    ch->peer = pid;
    snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, fd);
    ch->fd = open(path, O_RDWR | O_CLOEXEC);
    if (ch->fd < 0 || fstat(ch->fd, &sb) < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        goto error;
    }
    snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, rfd);
    ch->wfd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (ch->wfd < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        goto error;
    }
    if ((size_t)sb.st_size < sizeof(pp_chan_hdr) || pp_map_fd(ch, (size_t)sb.st_size) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "not a pyparallel channel");
        }
        goto error;
    }
    if (pp_hdr(ch)->magic != PP_CHAN_MAGIC) {
        PyErr_SetString(PyExc_ValueError, "not a pyparallel channel");
        goto error;
    }
    return (PyObject *)ch;
error:
    Py_DECREF(ch);
    return NULL;
}

/* The message stream of `parts` is [u64 total][part0][part1]...; writes the bytes of it from
 * *pos on while they fit; GIL-free. */
static size_t
pp_stream_write(pp_ring *r, char *data, uint64_t cap, const unsigned char *hdr, Py_buffer *views,
                Py_ssize_t nparts, uint64_t pos)
{
    size_t written = 0;
    uint64_t seg_start = 0;
    for (Py_ssize_t i = -1; i < nparts; i++) {
        const char *seg = i < 0 ? (const char *)hdr : (const char *)views[i].buf;
        uint64_t seg_len = i < 0 ? 8 : (uint64_t)views[i].len;
        if (pos < seg_start + seg_len) {
            uint64_t in = pos - seg_start;
            size_t n = pp_ring_write(r, data, cap, seg + in, (size_t)(seg_len - in));
            written += n;
            pos += n;
            if (n < seg_len - in) {
                break;
            }
        }
        seg_start += seg_len;
    }
    return written;
}

static int
pp_get_views(PyObject *parts, Py_buffer **views_out, Py_ssize_t *n_out, uint64_t *total)
{
    if (!PyTuple_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, "message parts must be a tuple of buffers");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(parts);
    Py_buffer *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(parts, i), &views[i], PyBUF_C_CONTIGUOUS) < 0) {
            for (Py_ssize_t j = 0; j < i; j++) {
                PyBuffer_Release(&views[j]);
            }
            PyMem_Free(views);
            return -1;
        }
        *total += (uint64_t)views[i].len;
    }
    *views_out = views;
    *n_out = n;
    return 0;
}

static void
pp_release_views(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyBuffer_Release(&views[i]);
    }
    PyMem_Free(views);
}

/* put(slot, parts, pos=0) -> pos: parent side, writes what fits of a task message without
 * blocking; the message is complete when the returned pos == 8 + total length. */
static PyObject *
Channel_put_held(PyObject *self, PyObject *args)
{
    ChannelObject *ch = (ChannelObject *)self;
    long slot;
    PyObject *parts;
    unsigned long long pos = 0;
    int wake = 1;
    Py_buffer *views = NULL;
    Py_ssize_t n = 0;
    uint64_t total;
    unsigned char hdr[8];
    if (!PyArg_ParseTuple(args, "lO|Kp:put", &slot, &parts, &pos, &wake) ||
        pp_check_slot(ch, slot) < 0) {
        return NULL;
    }
    if (pp_get_views(parts, &views, &n, &total) < 0) {
        return NULL;
    }
    if (pos > total + 8) {
        pp_release_views(views, n);
        PyErr_SetString(PyExc_ValueError, "put(): pos is past the end of the message");
        return NULL;
    }
    memcpy(hdr, &total, 8);
    pp_ring *r = pp_task_ring(ch, (uint32_t)slot);
    char *data = pp_task_data(ch, (uint32_t)slot);
    uint64_t cap = pp_hdr(ch)->task_cap;
    size_t written;
    if (total + 8 - pos >= PP_TUNE_NOGIL_COPY) {
        Py_BEGIN_ALLOW_THREADS
        written = pp_stream_write(r, data, cap, hdr, views, n, pos);
        Py_END_ALLOW_THREADS
    }
    else {
        written = pp_stream_write(r, data, cap, hdr, views, n, pos);
    }
    pp_release_views(views, n);
    pos += written;
    /* While set, the worker wakes the collector whenever it reads. */
    atomic_store(&r->prod_wait, pos < total + 8);
    if (written && wake) {
        pp_ring_signal_data(r);
    }
    return PyLong_FromUnsignedLongLong(pos);
}

/* wake(slot): parent side, wakes the slot's worker for data written with put(wake=False).
 * Writing several tasks first and waking afterwards keeps a woken worker from taking the
 * CPU of the thread that is still writing. */
static PyObject *
Channel_wake(PyObject *self, PyObject *arg)
{
    ChannelObject *ch = (ChannelObject *)self;
    long slot = PyLong_AsLong(arg);
    if ((slot == -1 && PyErr_Occurred()) || pp_check_slot(ch, slot) < 0) {
        return NULL;
    }
    pp_ring_signal_data(pp_task_ring(ch, (uint32_t)slot));
    Py_RETURN_NONE;
}

/* get(slot) -> bytearray | None: parent side, the next complete result message of a slot, or
 * None while it is incomplete. Never blocks. */
static PyObject *
Channel_get_held(PyObject *self, PyObject *arg)
{
    ChannelObject *ch = (ChannelObject *)self;
    long slot = PyLong_AsLong(arg);
    if ((slot == -1 && PyErr_Occurred()) || pp_check_slot(ch, slot) < 0) {
        return NULL;
    }
    if (!ch->owner) {
        PyErr_SetString(PyExc_ValueError, "get() is for the channel's owner");
        return NULL;
    }
    pp_ring *r = pp_result_ring(ch, (uint32_t)slot);
    const char *data = pp_result_data(ch, (uint32_t)slot);
    uint64_t cap = pp_hdr(ch)->result_cap;
    pp_partial *p = &ch->partial[slot];
    size_t got = 0;
    if (p->buf == NULL) {
        size_t n = pp_ring_read(r, data, cap, (char *)p->hdr + p->hdr_got, 8 - (size_t)p->hdr_got);
        got += n;
        p->hdr_got += (int)n;
        if (p->hdr_got < 8) {
            goto incomplete;
        }
        uint64_t len;
        memcpy(&len, p->hdr, 8);
        if (len > (uint64_t)PY_SSIZE_T_MAX) {
            PyErr_SetString(PyExc_OverflowError, "channel message too large");
            return NULL;
        }
        p->buf = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)len);
        if (p->buf == NULL) {
            return NULL;
        }
        p->got = 0;
    }
    uint64_t len = (uint64_t)PyByteArray_GET_SIZE(p->buf);
    char *dst = PyByteArray_AS_STRING(p->buf) + p->got;
    size_t n;
    if (len - p->got >= PP_TUNE_NOGIL_COPY) {
        Py_BEGIN_ALLOW_THREADS
        n = pp_ring_read(r, data, cap, dst, (size_t)(len - p->got));
        Py_END_ALLOW_THREADS
    }
    else {
        n = pp_ring_read(r, data, cap, dst, (size_t)(len - p->got));
    }
    got += n;
    p->got += n;
    if (got) {
        pp_ring_signal_space(r);
    }
    if (p->got < len) {
        Py_RETURN_NONE;
    }
    PyObject *py_msg = p->buf; /* reference moves to the caller */
    p->buf = NULL;
    p->hdr_got = 0;
    return py_msg;
incomplete:
    if (got) {
        pp_ring_signal_space(r);
    }
    Py_RETURN_NONE;
}

/* True when the collector has something to do on some slot: a result, or room for a task
 * message whose writing had stalled. */
static int
pp_parent_ready(ChannelObject *ch)
{
    pp_chan_hdr *h = pp_hdr(ch);
    for (uint32_t i = 0; i < h->nslots; i++) {
        pp_ring *res = pp_result_ring(ch, i);
        if (atomic_load(&res->head) != atomic_load(&res->tail)) {
            return 1;
        }
        pp_ring *task = pp_task_ring(ch, i);
        if (atomic_load(&task->prod_wait) &&
            atomic_load(&task->head) - atomic_load(&task->tail) < h->task_cap) {
            return 1;
        }
    }
    return 0;
}

static int
pp_parent_ready_cb(void *arg)
{
    return pp_parent_ready((ChannelObject *)arg);
}

/* spin(usec) -> bool: parent side, for a caller about to block on a result: polls the rings
 * for up to usec microseconds (GIL released) while the workers are told not to wake the
 * collector; True when there is something to collect.
 *
 * A caller that found something will collect it itself, and is likely to spin again soon (a
 * loop of apply_async().get()): it takes a lease (lease_usec, PP_TUNE_SPIN_LEASE_NS by
 * default) during which workers
 * still do not wake the collector, which sleeps only until the lease ends and then looks for
 * itself. Without it, every result would wake the collector thread for nothing, and that
 * thread would take the CPU of the worker or of the caller. A caller that found nothing
 * arms the collector again, and wakes it if something arrived in the meantime. */
/* Parses (first, second=default) positional-or-keyword arguments of a fastcall method; the
 * second is a duration in microseconds (a non-negative number). -1 on error. */
static int
pp_two_args(const char *fname, const char *second_name, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames, PyObject **first, double *second)
{
    PyObject *py_second = nargs > 1 ? args[1] : NULL;
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 1 or 2 positional arguments (%zd given)", fname,
                     nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *py_name = PyTuple_GET_ITEM(kwnames, i); /* borrowed */
        if (PyUnicode_CompareWithASCIIString(py_name, second_name) != 0 || py_second != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument '%S'", fname,
                         py_name);
            return -1;
        }
        py_second = args[nargs + i];
    }
    *first = args[0];
    if (py_second != NULL) {
        double v = PyFloat_AsDouble(py_second);
        if (v == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        if (!(v >= 0 && v <= 1e9)) {
            PyErr_Format(PyExc_ValueError, "%s must be between 0 and 1e9 microseconds",
                         second_name);
            return -1;
        }
        *second = v;
    }
    return 0;
}

static PyObject *
Channel_spin_held(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    ChannelObject *ch = (ChannelObject *)self;
    PyObject *arg;
    double lease_us = PP_TUNE_SPIN_LEASE_NS / 1000.0;
    if (pp_two_args("spin", "lease_usec", args, nargs, kwnames, &arg, &lease_us) < 0) {
        return NULL;
    }
    double us = PyFloat_AsDouble(arg);
    if ((us == -1.0 && PyErr_Occurred()) || pp_check_slot(ch, 0) < 0) {
        return NULL;
    }
    int64_t lease_ns = (int64_t)(lease_us * 1000.0);
    if (!ch->owner) {
        PyErr_SetString(PyExc_ValueError, "spin() is for the channel's owner");
        return NULL;
    }
    int found;
    Py_BEGIN_ALLOW_THREADS
    pp_chan_hdr *h = pp_hdr(ch);
    atomic_store(&h->parent_waiting, 0);
    int64_t spin_ns = pp_spin_budget(&ch->gate, (int64_t)(us * 1000.0));
    found = pp_parent_ready(ch);
    if (!found && spin_ns > 0) {
        found = pp_spin(pp_parent_ready_cb, ch, spin_ns);
        pp_spin_record(&ch->gate, found);
    }
    int poke;
    if (found) {
        int64_t now = pp_now_ns();
        /* a new lease: the collector may be asleep without a timeout; tell it once */
        poke = atomic_exchange(&ch->lease_until, now + lease_ns) <= now;
    }
    else {
        atomic_store(&ch->lease_until, 0);
        atomic_store(&h->parent_waiting, 1);
        /* arrived while the workers were told not to write: hand it to the collector */
        poke = pp_parent_ready(ch);
    }
    if (poke) {
        char b = 1;
        if (write(ch->wfd, &b, 1) < 0) {
            /* EAGAIN: the pipe is full, so the collector wakes anyway */
        }
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(found);
}

/* wait(fds, timeout) -> bool: parent side, sleeps (GIL released) until a result or ring space
 * arrives, one of `fds` (worker sentinels) becomes readable, notify() is called, or timeout
 * seconds pass (None: no limit). True unless it timed out. */
static PyObject *
Channel_wait_held(PyObject *self, PyObject *args)
{
    ChannelObject *ch = (ChannelObject *)self;
    PyObject *fds, *py_timeout = Py_None;
    PyObject *py_seq = NULL;
    struct pollfd *pfds = NULL;
    if (!PyArg_ParseTuple(args, "O|O:wait", &fds, &py_timeout) || pp_check_slot(ch, 0) < 0) {
        return NULL;
    }
    if (!ch->owner) {
        PyErr_SetString(PyExc_ValueError, "wait() is for the channel's owner");
        return NULL;
    }
    int timeout_ms = -1;
    if (py_timeout != Py_None) {
        double t = PyFloat_AsDouble(py_timeout);
        if (t == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        timeout_ms = t <= 0 ? 0 : (t > 1e6 ? 1000000000 : (int)(t * 1000.0 + 0.5));
    }
    /* A tuple (a copy of a list): fileno() is Python code that may change the caller's list. */
    py_seq = PySequence_Tuple(fds);
    if (py_seq == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_SetString(PyExc_TypeError, "fds must be a sequence of file descriptors");
        }
        return NULL;
    }
    Py_ssize_t nfds = PyTuple_GET_SIZE(py_seq);
    pfds = PyMem_Calloc((size_t)nfds + 1, sizeof(struct pollfd));
    if (pfds == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    pfds[0].fd = ch->rfd;
    pfds[0].events = POLLIN;
    for (Py_ssize_t i = 0; i < nfds; i++) {
        int fd = PyObject_AsFileDescriptor(PyTuple_GET_ITEM(py_seq, i)); /* borrowed */
        if (fd < 0) {
            goto error;
        }
        pfds[i + 1].fd = fd;
        pfds[i + 1].events = POLLIN;
    }
    int rc = 1, err = 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t now = pp_now_ns(), lease = atomic_load(&ch->lease_until);
    if (lease > now) {
        /* callers are collecting (see spin): look again when their lease ends, unasked */
        int lease_ms = (int)((lease - now + 999999) / 1000000);
        if (timeout_ms < 0 || lease_ms < timeout_ms) {
            timeout_ms = lease_ms;
        }
    }
    else {
        atomic_store(&pp_hdr(ch)->parent_waiting, 1);
    }
    if (!pp_parent_ready(ch)) {
        do {
            rc = poll(pfds, (nfds_t)nfds + 1, timeout_ms);
        } while (rc < 0 && errno == EINTR); /* a collector thread sees no Python signals */
        err = errno;
    }
    atomic_store(&pp_hdr(ch)->parent_waiting, 0);
    char drain[64];
    while (read(ch->rfd, drain, sizeof drain) > 0) {
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(pfds);
    Py_DECREF(py_seq);
    if (rc < 0) {
        return pp_raise(PP_ERR_OS, err);
    }
    return PyBool_FromLong(rc > 0);
error:
    PyMem_Free(pfds);
    Py_XDECREF(py_seq);
    return NULL;
}

/* notify(): wakes the collector out of wait(). */
static PyObject *
Channel_notify(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    ChannelObject *ch = (ChannelObject *)self;
    if (ch->wfd >= 0) {
        char b = 1;
        if (write(ch->wfd, &b, 1) < 0 && errno != EAGAIN) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_RETURN_NONE;
}

/* reset(slot): parent side, empties both rings of a slot whose worker is gone. */
static PyObject *
Channel_reset(PyObject *self, PyObject *arg)
{
    ChannelObject *ch = (ChannelObject *)self;
    long slot = PyLong_AsLong(arg);
    if ((slot == -1 && PyErr_Occurred()) || pp_check_slot(ch, slot) < 0) {
        return NULL;
    }
    pp_ring *rings[2] = {pp_task_ring(ch, (uint32_t)slot), pp_result_ring(ch, (uint32_t)slot)};
    for (int i = 0; i < 2; i++) {
        atomic_store(&rings[i]->head, 0);
        atomic_store(&rings[i]->tail, 0);
        atomic_store(&rings[i]->cons_wait, 0);
        atomic_store(&rings[i]->prod_wait, 0);
    }
    if (ch->partial) {
        Py_CLEAR(ch->partial[slot].buf);
        ch->partial[slot].hdr_got = 0;
    }
    Py_RETURN_NONE;
}

/* recv(slot) -> bytearray: worker side, blocks (GIL released, signals seen every slice) for
 * the next whole task message. Raises BrokenPipeError when the parent has died. */
static PyObject *
Channel_recv_held(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    ChannelObject *ch = (ChannelObject *)self;
    PyObject *arg;
    double spin_us = PP_TUNE_WORKER_SPIN_NS / 1000.0;
    if (pp_two_args("recv", "spin_usec", args, nargs, kwnames, &arg, &spin_us) < 0) {
        return NULL;
    }
    int64_t spin_ns = (int64_t)(spin_us * 1000.0);
    long slot = PyLong_AsLong(arg);
    if ((slot == -1 && PyErr_Occurred()) || pp_check_slot(ch, slot) < 0) {
        return NULL;
    }
    pp_ring *r = pp_task_ring(ch, (uint32_t)slot);
    const char *data = pp_task_data(ch, (uint32_t)slot);
    uint64_t cap = pp_hdr(ch)->task_cap;
    PyObject *py_msg = NULL;
    unsigned char hdr[8];
    uint64_t len = 0, got = 0;
    int have_len = 0;
    pp_status st = PP_OK;
    for (;;) {
        char *dst = have_len ? PyByteArray_AS_STRING(py_msg) + got : (char *)hdr + got;
        uint64_t want = (have_len ? len : 8) - got;
        size_t n;
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            n = pp_ring_read(r, data, cap, dst, (size_t)want);
            if (n > 0) {
                pp_ring_signal_space(r);
                if (atomic_load(&r->prod_wait)) { /* the parent clears it in put() */
                    pp_wake_parent(ch);
                }
                break;
            }
            int64_t ns = pp_spin_budget(&ch->gate, spin_ns);
            if (ns > 0) {
                int paid = pp_spin(pp_ring_has_data, r, ns);
                pp_spin_record(&ch->gate, paid);
                if (paid) {
                    continue;
                }
            }
            st = pp_ring_wait(r, cap, 1);
            if (st != PP_OK) {
                break;
            }
        }
        Py_END_ALLOW_THREADS
        if (st != PP_OK) {
            st = PP_OK;
            if (pp_worker_check(ch) < 0) {
                goto error;
            }
            continue;
        }
        got += n;
        if (!have_len && got == 8) {
            memcpy(&len, hdr, 8);
            if (len > (uint64_t)PY_SSIZE_T_MAX) {
                PyErr_SetString(PyExc_OverflowError, "channel message too large");
                goto error;
            }
            py_msg = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)len);
            if (py_msg == NULL) {
                goto error;
            }
            have_len = 1;
            got = 0;
        }
        if (have_len && got == len) {
            return py_msg;
        }
    }
error:
    Py_XDECREF(py_msg);
    return NULL;
}

/* send(slot, parts): worker side, writes a whole result message, blocking (GIL released)
 * while the ring is full, and wakes the parent. */
static PyObject *
Channel_send_held(PyObject *self, PyObject *args)
{
    ChannelObject *ch = (ChannelObject *)self;
    long slot;
    PyObject *parts;
    Py_buffer *views = NULL;
    Py_ssize_t n = 0;
    uint64_t total, pos = 0;
    unsigned char hdr[8];
    if (!PyArg_ParseTuple(args, "lO:send", &slot, &parts) || pp_check_slot(ch, slot) < 0) {
        return NULL;
    }
    if (pp_get_views(parts, &views, &n, &total) < 0) {
        return NULL;
    }
    memcpy(hdr, &total, 8);
    pp_ring *r = pp_result_ring(ch, (uint32_t)slot);
    char *data = pp_result_data(ch, (uint32_t)slot);
    uint64_t cap = pp_hdr(ch)->result_cap;
    while (pos < total + 8) {
        pp_status st = PP_OK;
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            size_t w = pp_stream_write(r, data, cap, hdr, views, n, pos);
            pos += w;
            if (w > 0) {
                pp_ring_signal_data(r);
                pp_wake_parent(ch);
            }
            if (pos == total + 8) {
                break;
            }
            st = pp_ring_wait(r, cap, 0);
            if (st != PP_OK) {
                break;
            }
        }
        atomic_store(&r->prod_wait, 0);
        Py_END_ALLOW_THREADS
        if (st != PP_OK && pp_worker_check(ch) < 0) {
            pp_release_views(views, n);
            return NULL;
        }
    }
    pp_release_views(views, n);
    Py_RETURN_NONE;
}

/* The methods that release the GIL hold the mapping for their whole call: another thread's
 * close() meanwhile only marks the channel closing, and the last of them unmaps it. */
#define PP_HELD_METHOD(name)                                                                       \
    static PyObject *Channel_##name(PyObject *self, PyObject *arg)                                 \
    {                                                                                              \
        ChannelObject *ch = (ChannelObject *)self;                                                 \
        ch->busy++;                                                                                \
        PyObject *res = Channel_##name##_held(self, arg);                                          \
        if (--ch->busy == 0 && ch->closing) {                                                      \
            pp_channel_release(ch);                                                                \
        }                                                                                          \
        return res;                                                                                \
    }
PP_HELD_METHOD(put)
PP_HELD_METHOD(get)
PP_HELD_METHOD(wait)
PP_HELD_METHOD(send)
#undef PP_HELD_METHOD
#define PP_HELD_FASTCALL(name)                                                                     \
    static PyObject *Channel_##name(PyObject *self, PyObject *const *args, Py_ssize_t nargs,       \
                                    PyObject *kwnames)                                             \
    {                                                                                              \
        ChannelObject *ch = (ChannelObject *)self;                                                 \
        ch->busy++;                                                                                \
        PyObject *res = Channel_##name##_held(self, args, nargs, kwnames);                         \
        if (--ch->busy == 0 && ch->closing) {                                                      \
            pp_channel_release(ch);                                                                \
        }                                                                                          \
        return res;                                                                                \
    }
PP_HELD_FASTCALL(spin)
PP_HELD_FASTCALL(recv)
#undef PP_HELD_FASTCALL

static PyObject *
Channel_get_fds(PyObject *self, void *Py_UNUSED(closure))
{
    ChannelObject *ch = (ChannelObject *)self;
    return Py_BuildValue("(ii)", ch->fd, ch->rfd);
}

static PyObject *
Channel_get_nslots(PyObject *self, void *Py_UNUSED(closure))
{
    ChannelObject *ch = (ChannelObject *)self;
    return PyLong_FromUnsignedLong(ch->base ? pp_hdr(ch)->nslots : 0);
}

/* Unmaps the region and closes the descriptors; idempotent. */
static void
pp_channel_release(ChannelObject *ch)
{
    if (ch->partial) {
        uint32_t n = ch->base ? pp_hdr(ch)->nslots : 0;
        for (uint32_t i = 0; i < n; i++) {
            Py_CLEAR(ch->partial[i].buf);
        }
        PyMem_Free(ch->partial);
        ch->partial = NULL;
    }
    if (ch->base) {
        munmap(ch->base, ch->size);
        ch->base = NULL;
    }
    int *fds[3] = {&ch->fd, &ch->rfd, &ch->wfd};
    for (int i = 0; i < 3; i++) {
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
    }
}

static PyObject *
Channel_close(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    ChannelObject *ch = (ChannelObject *)self;
    if (ch->busy > 0) {
        ch->closing = 1; /* released when the calls in progress return */
    }
    else {
        pp_channel_release(ch);
    }
    Py_RETURN_NONE;
}

/* The channel owns the bytearrays of partly received results (one per slot): GC-visible. */
static int
Channel_traverse(PyObject *self, visitproc visit, void *arg)
{
    ChannelObject *ch = (ChannelObject *)self;
    Py_VISIT(Py_TYPE(self));
    if (ch->partial != NULL && ch->base != NULL) {
        for (uint32_t i = 0; i < pp_hdr(ch)->nslots; i++) {
            Py_VISIT(ch->partial[i].buf);
        }
    }
    return 0;
}

static int
Channel_clear(PyObject *self)
{
    ChannelObject *ch = (ChannelObject *)self;
    if (ch->partial != NULL && ch->base != NULL) {
        for (uint32_t i = 0; i < pp_hdr(ch)->nslots; i++) {
            Py_CLEAR(ch->partial[i].buf);
            ch->partial[i].hdr_got = 0;
        }
    }
    return 0;
}

static void
Channel_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    pp_channel_release((ChannelObject *)self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef Channel_methods[] = {
    {"attach", Channel_attach, METH_VARARGS | METH_CLASS,
     "attach(pid, fd, pipe_fd)\n--\n\nA worker's view of the channel of process pid."},
    {"put", Channel_put, METH_VARARGS,
     "put(slot, parts, pos=0, wake=True)\n--\n\nParent: write what fits of a task message; "
     "returns the new position (complete at 8 + total length). Never blocks."},
    {"wake", Channel_wake, METH_O,
     "wake(slot)\n--\n\nParent: wake the worker of a slot written with put(wake=False)."},
    {"get", Channel_get, METH_O,
     "get(slot)\n--\n\nParent: the next complete result message (bytearray) or None."},
    {"wait", Channel_wait, METH_VARARGS,
     "wait(fds, timeout=None)\n--\n\nParent: sleep until there is work, an fd is readable, "
     "notify() is called or the timeout passes. False on timeout."},
    {"spin", (PyCFunction)(void (*)(void))Channel_spin, METH_FASTCALL | METH_KEYWORDS,
     "spin(usec, lease_usec=1000.0)\n--\n\nParent: poll the rings for up to usec microseconds; "
     "True when there is something to collect (and then a lease of lease_usec during which "
     "workers do not wake the collector)."},
    {"notify", Channel_notify, METH_NOARGS, "notify()\n--\n\nWake the parent out of wait()."},
    {"reset", Channel_reset, METH_O, "reset(slot)\n--\n\nParent: empty a dead worker's rings."},
    {"recv", (PyCFunction)(void (*)(void))Channel_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(slot, spin_usec=50.0)\n--\n\nWorker: block for the next task message (bytearray), "
     "polling the ring for spin_usec before sleeping."},
    {"send", Channel_send, METH_VARARGS,
     "send(slot, parts)\n--\n\nWorker: write a whole result message, blocking while full."},
    {"close", Channel_close, METH_NOARGS, "close()\n--\n\nUnmap and close the channel."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Channel_getset[] = {
    {"fds", Channel_get_fds, NULL, "(memfd, wake-pipe read end) to pass to attach()", NULL},
    {"nslots", Channel_get_nslots, NULL, "number of worker slots", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Channel_slots[] = {
    {Py_tp_new, Channel_new},
    {Py_tp_dealloc, Channel_dealloc},
    {Py_tp_traverse, Channel_traverse},
    {Py_tp_clear, Channel_clear},
    {Py_tp_methods, Channel_methods},
    {Py_tp_getset, Channel_getset},
    {Py_tp_doc, "Channel(nslots, task_bytes, result_bytes)\n--\n\n"
                "Shared-memory task/result rings between a pool's parent and its workers."},
    {0, NULL},
};

static PyType_Spec Channel_spec = {
    .name = "pyparallel._core.Channel",
    .basicsize = sizeof(ChannelObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = Channel_slots,
};

int
pp_channel_exec(PyObject *module, pp_state *st)
{
    st->ChannelType = PyType_FromModuleAndSpec(module, &Channel_spec, NULL);
    if (st->ChannelType == NULL) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "Channel", st->ChannelType);
}
