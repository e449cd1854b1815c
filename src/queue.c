/* queue.c: Ring, the many-producer many-consumer shared-memory queue under pyparallel's Queue,
 * JoinableQueue, SimpleQueue and Pipe, and RingBlock, a received big message read in place.
 *
 * Layout. One memfd (nothing in /dev/shm) per ring; every process that uses it maps all but
 * the fresh heap once:
 *   [header page][ring window: W bytes, sparse][recycled regions: 64 x 8 MiB, sparse]
 *   [fresh heap: one region per big message that found no recycled region, sparse]
 * The window is virtual (4 GiB by default): memory exists only where messages are. Consumers
 * give consumed memory back to the kernel in blocks (fallocate PUNCH_HOLE), so a ring costs
 * what its pending messages take, not its window.
 *
 * Records. A message is one 8-aligned record at `tail`: {u32 size, u8 kind, u8 tag, u16 nparts}
 * then the u64 length of each part (the pickle, then its out-of-band buffers). INLINE records
 * carry the parts' bytes after the lengths. A message bigger than PP_Q_INLINE_MAX goes out of
 * band: its HEAP record carries {offset, length, region ref} and the consumer reads the buffers
 * in place (zero-copy for numpy) until the last view of them dies. Up to PP_Q_SLOT_MAX it goes
 * into a recycled region (ref = generation << 32 | index + 1): one of PP_Q_SLOTS fixed slices
 * of the file, mapped once, whose memory stays allocated from one message to the next, since
 * allocating and faulting in fresh shared pages costs far more than copying into warm ones.
 * Bigger messages (or all regions busy) get a fresh region at a never-reused offset, mapped
 * per message and punched out at the end; it is named by one of PP_Q_FRESH fresh descriptors
 * (ref = generation << 32 | PP_Q_SLOTS + index + 1), or, when all are in use, by none (ref 0).
 * A record that would cross the end of the
 * window is preceded by a PAD record that sends the reader back to offset 0.
 *
 * Commit protocol (the state is consistent at every instruction a process can die at):
 *   - P = tail position << 30 | puts mod 2^30, written only by producers under the put lock,
 *     G = head position << 30 | gets mod 2^30, written only by consumers under the get lock.
 *     Each is changed by ONE atomic store, after the record is fully written (put) or fully
 *     copied out (get). A process that dies before that store changed nothing anyone can see
 *     (its partial bytes lie beyond tail and are overwritten); one that dies after it finished
 *     the operation. qsize() = puts - gets is therefore exact at every point.
 *   - F (freed position, block-aligned, F <= head) is advanced by the get-lock holder after it
 *     punched the blocks below head; producers count free space from F, so they never write a
 *     block that is being punched. A consumer that dies between committing G and advancing F
 *     leaves F behind; the next get catches it up (punching twice is harmless).
 *   - Locks are futex words holding the owner's pid. A waiter that slept PP_Q_LOCK_SLICE_NS
 *     checks the owner; if it is dead (or a zombie), the waiter frees the lock with one
 *     compare-exchange. No repair is ever needed, because nothing is committed under a lock
 *     except by the single store above.
 *   - The JoinableQueue count is done mod 2^30 (task_done() calls): unfinished = puts - done, so
 *     a producer killed mid-put can never leave join() waiting for an item that never arrived.
 *   - A region descriptor's state word (recycled or fresh) is {generation, holder pid},
 *     holder 0 meaning free. A producer claims a free one by compare-exchange (new
 *     generation, its pid), writes the message, stores the record's ring position in the
 *     descriptor, and commits the put; the region then belongs to the message. The consumer
 *     stores its own pid as the holder BEFORE it commits the get, and the block it returns
 *     gives the region back (holder 0) when the last view dies, in that process only (a
 *     forked child's inherited block does not). So a region is held by a dead process only
 *     when that process was writing it (not yet committed) or had taken its message; either
 *     way no record in [head, tail) names that generation, and a producer that finds no free
 *     region takes such a one over (a compare-exchange, so a consumer that took the message
 *     meanwhile wins); and every big put
 *     and every region given back first sweeps (at most every PP_Q_SWEEP_NS) for such regions
 *     and takes them all back: a recycled one goes to the free ones, a fresh one is punched
 *     out (its descriptor names it before it is allocated, length 0 first, so a stale one
 *     never covers another region; offsets are never reused, so punching a stale one again is
 *     harmless). A region whose message is still in the ring is never taken, whoever wrote
 *     it. Free recycled regions keep their memory up to PP_Q_CACHE_MAX in all; past that the
 *     one given back is punched out. Only a fresh region that found no free descriptor (more
 *     than PP_Q_FRESH in use) stays allocated when its producer dies before the commit.
 *     (A child that keeps using a block inherited by fork after its parent died may see that
 *     region reused: a received message belongs to the process that took it.)
 *   - in_bytes - out_bytes counts unread payload bytes for a put's `maxbytes` bound (a Pipe's
 *     flow control): see pp_ring_pending() for how a death between count and commit is
 *     repaired.
 * Waits: consumers sleep on put_seq, producers (full queue) on get_seq, join() on done; a
 * waker bumps the word and calls FUTEX_WAKE only when someone sleeps. Every sleep lasts at
 * most PP_Q_SLICE_NS, so a wake-up lost with a dying process costs at most one slice, and the
 * caller checks signals (Ctrl-C) between slices. Before sleeping a waiter polls for up to
 * PP_Q_SPIN_NS while such polls pay (util.h's spin gate, one per ring object and process):
 * replies often come within microseconds, but on a machine with more runnable processes than
 * CPUs the peer may need this very CPU, and then the waiter sleeps at once.
 * The GIL is released only to wait and to copy a big message into its region (outside the
 * locks); records are read and written with the GIL held, and only non-GC objects (bytes,
 * bytearray, RingBlock) are allocated under a ring lock, so no Python code can run while one
 * is held.
 *
 * The clock, futex, pid-liveness and cached-pid helpers are util.h's. */
#define _GNU_SOURCE
#include "queue.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define PP_Q_MAGIC 0x7070717565756533ULL /* "ppqueue3" */
#define PP_Q_DATA_OFF 8192               /* the header pages */
#define PP_Q_WINDOW_DEFAULT (1ULL << 32)
#define PP_Q_BLOCK (256u * 1024u) /* consumed window memory is given back in these units */
#define PP_Q_INLINE_MAX 65536     /* bigger messages get a heap region */
#define PP_Q_CNT_BITS 30
#define PP_Q_CNT_MASK ((1ULL << PP_Q_CNT_BITS) - 1)
#define PP_Q_POS_MASK ((1ULL << 34) - 1) /* positions are mod 2^34 >= 2 * the largest window */
#define PP_Q_SLICE_NS 50000000LL         /* longest sleep between signal checks */
#define PP_Q_LOCK_SLICE_NS 5000000LL     /* a lock waiter checks the owner this often */
#define PP_Q_SPIN_NS 50000LL             /* a waiter polls this long before it sleeps */
#define PP_Q_MAX_PARTS 65535
#define PP_Q_ALIGN 64                /* heap parts start on cache lines (numpy alignment) */
#define PP_Q_SLOTS 64                /* recycled regions per ring */
#define PP_Q_SLOT_MAX (8ULL << 20)   /* the biggest message a recycled region carries */
#define PP_Q_CACHE_MAX (32ULL << 20) /* free recycled regions keep at most this much memory */
#define PP_Q_PID_MASK 0xffffffffULL
#define PP_Q_FRESH 64                        /* fresh regions tracked for the sweep */
#define PP_Q_DESCS (PP_Q_SLOTS + PP_Q_FRESH) /* region descriptors: recycled, then fresh */
#define PP_Q_SWEEP_NS 2000000LL              /* dead holders are looked for at most this often */

enum { PP_REC_PAD = 1, PP_REC_INLINE = 2, PP_REC_HEAP = 3 };

typedef struct {
    uint32_t size; /* bytes after this header, a multiple of 8 */
    uint8_t kind;
    uint8_t tag; /* the Python layer's: pickle or raw bytes */
    uint16_t nparts;
} pp_qrec;

typedef struct {
    _Atomic uint32_t word; /* owner pid, 0 when free */
    _Atomic uint32_t waiters;
} pp_qlock;

/* A region descriptor. Indices below PP_Q_SLOTS are the recycled regions: PP_Q_SLOT_MAX bytes
 * of the file at slot_base + index * PP_Q_SLOT_MAX. The others describe fresh regions in use
 * (at `off`, `len` bytes), so that one whose holder died can be punched out. */
typedef struct {
    _Atomic uint64_t state; /* generation << 32 | holder pid; holder 0: free for the next message */
    _Atomic uint64_t pos;   /* ring position of the record carrying it (stored before the commit) */
    _Atomic uint64_t len;   /* bytes allocated from its start (changed only by its holder) */
    _Atomic uint64_t uses;  /* messages it carried (diagnostics) */
    _Atomic uint64_t off;   /* a fresh region's file offset (changed only by its holder) */
} pp_qslot;

typedef struct {
    uint64_t magic;
    uint64_t window;
    uint64_t heap_base;
    _Atomic uint64_t heap_next;  /* next fresh heap file offset; only grows */
    _Atomic uint64_t recoveries; /* locks freed from dead owners (diagnostics) */
    uint64_t slot_base;          /* file offset of the recycled regions */
    _Atomic uint64_t reclaims;   /* recycled regions taken back from dead holders (diagnostics) */
    char pad0[8];
    pp_qlock plock;
    _Atomic uint64_t P;
    _Atomic uint32_t put_seq;     /* futex: bumped after each put */
    _Atomic uint32_t get_waiters; /* consumers asleep on put_seq */
    _Atomic uint64_t in_bytes;    /* payload bytes put, written under the put lock */
    char pad1[32];
    pp_qlock glock;
    _Atomic uint64_t G;
    _Atomic uint64_t F;
    _Atomic uint32_t get_seq;     /* futex: bumped after each get */
    _Atomic uint32_t put_waiters; /* producers asleep on get_seq */
    _Atomic uint64_t out_bytes;   /* payload bytes taken, written under the get lock */
    char pad2[24];
    _Atomic uint32_t done; /* task_done() calls mod 2^30; futex for join() */
    _Atomic uint32_t join_waiters;
    _Atomic uint64_t sweep_ns; /* when dead holders were last looked for */
    _Alignas(64) pp_qslot slots[PP_Q_DESCS];
} pp_qhdr;

_Static_assert(sizeof(pp_qhdr) <= PP_Q_DATA_OFF, "the ring header must fit its pages");

typedef struct {
    PyObject_HEAD
    int fd;
    char *base; /* the whole mapping */
    size_t maplen;
    pp_qhdr *h;
    char *data; /* the window */
    uint64_t window;
    unsigned long long ino;
    PyObject *block_type; /* RingBlock, for big messages */
    pp_spin_gate gate;    /* this process's waits on the ring: spin only while it pays */
} RingObject;

typedef struct {
    PyObject_HEAD
    RingObject *ring; /* strong: keeps the mapping and the fd for the release at the end */
    char *addr;
    size_t len;
    uint64_t off;
    Py_ssize_t exports;
    int slot;       /* its descriptor (recycled below PP_Q_SLOTS, else a fresh region mapped for
                     * this block), or -1: an untracked fresh region */
    uint32_t owner; /* the process that took the message (the one that gives the region back) */
    uint64_t held;  /* the slot's state while this block holds it */
} RingBlockObject;

/* ---- locks ---- */

static inline int
pp_q_trylock(pp_qlock *l, uint32_t me)
{
    uint32_t z = 0;
    return atomic_compare_exchange_strong(&l->word, &z, me);
}

static inline void
pp_q_unlock(pp_qlock *l)
{
    atomic_store(&l->word, 0);
    if (atomic_load(&l->waiters) != 0) {
        pp_futex_wake(&l->word, 1);
    }
}

/* Waits (GIL released) until the lock looks free, freeing it when its owner died. PP_OK means
 * "try again", PP_ERR_TIMEOUT that the deadline (< 0: none) passed. */
static pp_status
pp_q_lock_wait(pp_qhdr *h, pp_qlock *l, long long deadline)
{
    /* A lock is held for well under a microsecond, unless its holder lost its CPU: poll,
     * then yield (the holder may be waiting for this CPU), then sleep. */
    for (int round = 0; round < 8; round++) {
        for (int i = 0; i < 32; i++) {
            if (atomic_load_explicit(&l->word, memory_order_relaxed) == 0) {
                return PP_OK;
            }
            pp_cpu_relax();
        }
        if (round > 0) {
            sched_yield();
        }
    }
    uint32_t owner = atomic_load(&l->word);
    if (owner == 0) {
        return PP_OK;
    }
    long long now = pp_now_ns();
    if (deadline >= 0 && now >= deadline) {
        return PP_ERR_TIMEOUT;
    }
    long long ns = PP_Q_LOCK_SLICE_NS;
    if (deadline >= 0 && deadline - now < ns) {
        ns = deadline - now;
    }
    atomic_fetch_add(&l->waiters, 1);
    int r = pp_futex_wait(&l->word, owner, ns);
    int err = errno;
    atomic_fetch_sub(&l->waiters, 1);
    if (r < 0 && err == ETIMEDOUT && owner != pp_self_pid() && pp_proc_dead((pid_t)owner)) {
        /* Nothing is half-committed under a lock (see the protocol above): just free it. */
        if (atomic_compare_exchange_strong(&l->word, &owner, 0)) {
            atomic_fetch_add(&h->recoveries, 1);
            pp_futex_wake(&l->word, INT_MAX);
        }
    }
    return PP_OK;
}

/* Waits (GIL released) until *word differs from `seen`, a slice ends, or the deadline passes
 * (PP_ERR_TIMEOUT). Polls first while `gate` says polling pays (a reply often comes within
 * microseconds); never yields while it polls: on a busy machine sched_yield() hands the CPU
 * to another runnable process for its whole slice (milliseconds), and the gate stops the
 * polling there anyway. */
static pp_status
pp_q_wait_word(_Atomic uint32_t *word, uint32_t seen, _Atomic uint32_t *waiters, long long deadline,
               pp_spin_gate *gate)
{
    long long now = pp_now_ns();
    long long spin_ns = pp_spin_budget(gate, PP_Q_SPIN_NS);
    long long spin_end = now + spin_ns;
    if (deadline >= 0 && deadline < spin_end) {
        spin_end = deadline;
    }
    while (now < spin_end) {
        for (int i = 0; i < 32; i++) {
            if (atomic_load_explicit(word, memory_order_acquire) != seen) {
                pp_spin_record(gate, 1);
                return PP_OK;
            }
            pp_cpu_relax();
        }
        now = pp_now_ns();
    }
    if (spin_ns > 0) {
        pp_spin_record(gate, 0);
    }
    if (atomic_load_explicit(word, memory_order_acquire) != seen) {
        return PP_OK;
    }
    if (deadline >= 0 && now >= deadline) {
        return PP_ERR_TIMEOUT;
    }
    long long ns = PP_Q_SLICE_NS;
    if (deadline >= 0 && deadline - now < ns) {
        ns = deadline - now;
    }
    atomic_fetch_add(waiters, 1);
    int r = pp_futex_wait(word, seen, ns);
    int err = errno;
    atomic_fetch_sub(waiters, 1);
    if (r < 0 && err == EINTR) {
        return PP_ERR_INTERRUPT;
    }
    return PP_OK;
}

static inline void
pp_q_bump(_Atomic uint32_t *word, _Atomic uint32_t *waiters, int n)
{
    atomic_fetch_add(word, 1);
    if (atomic_load(waiters) != 0) {
        pp_futex_wake(word, n);
    }
}

/* Deadline in CLOCK_MONOTONIC ns for a timeout in seconds (< 0: none). */
static long long
pp_q_deadline(double timeout)
{
    if (timeout < 0) {
        return -1;
    }
    if (timeout > 1e9) {
        timeout = 1e9;
    }
    return pp_now_ns() + (long long)(timeout * 1e9);
}

static inline uint64_t
pp_q_round(uint64_t n, uint64_t a)
{
    return (n + a - 1) / a * a;
}

static inline uint64_t
pp_q_count(uint64_t P, uint64_t G)
{
    return ((P & PP_Q_CNT_MASK) - (G & PP_Q_CNT_MASK)) & PP_Q_CNT_MASK;
}

/* ---- Ring ---- */

static int
pp_ring_map(RingObject *self, int fd, int create, uint64_t window)
{
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        return -1;
    }
    self->ino = (unsigned long long)sb.st_ino;
    pp_qhdr probe;
    if (!create) {
        if (pread(fd, &probe, sizeof(probe), 0) != (ssize_t)sizeof(probe) ||
            probe.magic != PP_Q_MAGIC) {
            errno = EINVAL;
            return -1;
        }
        window = probe.window;
    }
    uint64_t slot_base = pp_q_round(PP_Q_DATA_OFF + window, 1 << 21);
    uint64_t heap_base = slot_base + PP_Q_SLOTS * PP_Q_SLOT_MAX;
    if (!create && (probe.slot_base != slot_base || probe.heap_base != heap_base)) {
        errno = EINVAL;
        return -1;
    }
    if (create && ftruncate(fd, (off_t)heap_base) < 0) {
        return -1;
    }
    size_t len = (size_t)heap_base; /* the header, the window and the recycled regions */
    void *addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (addr == MAP_FAILED) {
        return -1;
    }
    self->fd = fd;
    self->base = addr;
    self->maplen = len;
    self->h = (pp_qhdr *)addr;
    self->data = (char *)addr + PP_Q_DATA_OFF;
    self->window = window;
    if (create) {
        self->h->window = window;
        self->h->slot_base = slot_base;
        self->h->heap_base = heap_base;
        atomic_store(&self->h->heap_next, heap_base);
        atomic_thread_fence(memory_order_release);
        self->h->magic = PP_Q_MAGIC; /* last: attachers check it */
    }
    return 0;
}

static RingObject *
pp_ring_alloc(PyTypeObject *type)
{
    PyObject *module = PyType_GetModule(type);
    if (module == NULL) {
        return NULL;
    }
    PyObject *bt = PyObject_GetAttrString(module, "RingBlock");
    if (bt == NULL) {
        return NULL;
    }
    RingObject *self = (RingObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(bt);
        return NULL;
    }
    self->fd = -1;
    self->block_type = bt; /* owned */
    return self;
}

/* Ring(window=4 GiB): a new empty ring. `window` (a power of two, 1 MiB .. 4 GiB) is there for
 * tests that want to see the window wrap and fill. */
static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned long long window = PP_Q_WINDOW_DEFAULT;
    static char *kwlist[] = {"window", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|K:Ring", kwlist, &window)) {
        return NULL;
    }
    if (window < (1ULL << 20) || window > PP_Q_WINDOW_DEFAULT || (window & (window - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "window must be a power of two from 1 MiB to 4 GiB");
        return NULL;
    }
    RingObject *self = pp_ring_alloc(type);
    if (self == NULL) {
        return NULL;
    }
#ifdef SYS_memfd_create
    int fd = (int)syscall(SYS_memfd_create, "pyparallel-queue", MFD_CLOEXEC);
#else
    int fd = memfd_create("pyparallel-queue", MFD_CLOEXEC);
#endif
    if (fd < 0 || pp_ring_map(self, fd, 1, window) < 0) {
        int err = errno;
        if (fd >= 0 && self->fd < 0) {
            close(fd);
        }
        Py_DECREF(self);
        return pp_raise(PP_ERR_OS, err);
    }
    return (PyObject *)self;
}

PyDoc_STRVAR(Ring_attach_doc, "attach($type, pid, fd, ino, /)\n--\n\n"
                              "Maps the ring that process `pid` holds as `fd` (inode `ino`).");

static PyObject *
Ring_attach(PyObject *cls, PyObject *args)
{
    long pid;
    int fd;
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "liK:attach", &pid, &fd, &ino)) {
        return NULL;
    }
    if (fd < 0 || pid <= 0) {
        PyErr_SetString(PyExc_ValueError, "invalid ring handle");
        return NULL;
    }
    int nfd = pp_open_peer_fd(pid, fd, ino, 0, "queue", "a queue");
    if (nfd < 0) {
        return NULL;
    }
    RingObject *self = pp_ring_alloc((PyTypeObject *)cls);
    if (self == NULL) {
        close(nfd);
        return NULL;
    }
    if (pp_ring_map(self, nfd, 0, 0) < 0) {
        close(nfd);
        Py_DECREF(self);
        PyErr_Format(PyExc_FileNotFoundError,
                     "queue is gone: fd %d of process %ld is another file now", fd, pid);
        return NULL;
    }
    return (PyObject *)self;
}

static void
Ring_dealloc(RingObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->base != NULL) {
        munmap(self->base, self->maplen);
    }
    if (self->fd >= 0) {
        close(self->fd);
    }
    Py_XDECREF(self->block_type);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* The parts of a message being put: buffers held for the duration of the call (in `local`
 * for the usual one to four parts, so that a small put allocates nothing). */
#define PP_Q_LOCAL_PARTS 4
typedef struct {
    Py_ssize_t n;
    Py_buffer *bufs;
    uint64_t total; /* sum of lengths */
    Py_buffer local[PP_Q_LOCAL_PARTS];
} pp_parts;

static void
pp_parts_release(pp_parts *p)
{
    for (Py_ssize_t i = 0; i < p->n; i++) {
        PyBuffer_Release(&p->bufs[i]);
    }
    if (p->bufs != p->local) {
        PyMem_Free(p->bufs);
    }
    p->bufs = NULL;
    p->n = 0;
}

/* `seq` is a list or tuple of buffers, or one buffer (a one-part message). */
static int
pp_parts_get(PyObject *seq, pp_parts *p)
{
    p->n = 0;
    p->bufs = p->local;
    p->total = 0;
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
        if (PyObject_GetBuffer(seq, &p->local[0], PyBUF_SIMPLE) < 0) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_SetString(PyExc_TypeError, "parts must be a buffer or a sequence of buffers");
            }
            return -1;
        }
        p->n = 1;
        p->total = (uint64_t)p->local[0].len;
        return 0;
    }
    PyObject *fast = PySequence_Fast(seq, "parts must be a sequence of buffers");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > PP_Q_MAX_PARTS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "a message has 1 to 65535 parts");
        return -1;
    }
    if (n > PP_Q_LOCAL_PARTS) {
        p->bufs = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
        if (p->bufs == NULL) {
            Py_DECREF(fast);
            PyErr_NoMemory();
            return -1;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &p->bufs[i], PyBUF_SIMPLE) < 0) {
            Py_DECREF(fast);
            pp_parts_release(p);
            return -1;
        }
        p->n = i + 1;
        p->total += (uint64_t)p->bufs[i].len;
    }
    Py_DECREF(fast);
    return 0;
}

/* Punches [off, off + len) of the ring's file: its memory goes back to the kernel. */
static void
pp_ring_punch(RingObject *r, uint64_t off, uint64_t len)
{
    (void)fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
}

/* ---- recycled regions ---- */

static inline uint64_t
pp_slot_off(pp_qhdr *h, int i)
{
    return h->slot_base + (uint64_t)i * PP_Q_SLOT_MAX;
}

/* What a HEAP record carries to name recycled region i held in state s. */
static inline uint64_t
pp_slot_ref(int i, uint64_t s)
{
    return (s & ~PP_Q_PID_MASK) | (uint64_t)(i + 1);
}

/* Whether region i (in state s) is carried by a message still in the ring: its record lies
 * in [head, tail) and names this generation. A stale read (the record taken and overwritten
 * meanwhile) answers "no", which is safe: the caller's compare-exchange then fails, because
 * the consumer changed the state before it committed the get. */
static int
pp_slot_queued(RingObject *r, int i, uint64_t s)
{
    pp_qhdr *h = r->h;
    uint64_t G = atomic_load(&h->G);
    uint64_t P = atomic_load(&h->P);
    uint64_t head = G >> PP_Q_CNT_BITS, tail = P >> PP_Q_CNT_BITS;
    uint64_t pos = atomic_load(&h->slots[i].pos);
    if (((pos - head) & PP_Q_POS_MASK) >= ((tail - head) & PP_Q_POS_MASK)) {
        return 0;
    }
    uint64_t off = pos & (r->window - 1);
    if (off + 32 > r->window) {
        return 0;
    }
    const volatile pp_qrec *hd = (const volatile pp_qrec *)(r->data + off);
    const volatile uint64_t *w = (const volatile uint64_t *)(r->data + off + 8);
    return hd->kind == PP_REC_HEAP && w[2] == pp_slot_ref(i, s);
}

/* Takes a recycled region for a message of `need` bytes (GIL released or held; touches no
 * Python object): the free one that fits best, else one whose holder died (a consumer killed
 * while it held a received message, or a producer killed before its put committed). Its
 * index, *held set to its new state; -1 when none is to be had. */
static int
pp_slot_claim(RingObject *r, uint64_t need, uint64_t *held)
{
    pp_qhdr *h = r->h;
    uint32_t me = pp_self_pid();
    for (int attempt = 0; attempt < 4; attempt++) {
        int best = -1;
        uint64_t best_len = 0, best_s = 0;
        for (int i = 0; i < PP_Q_SLOTS; i++) {
            uint64_t st = atomic_load_explicit(&h->slots[i].state, memory_order_relaxed);
            if ((st & PP_Q_PID_MASK) != 0) {
                continue;
            }
            uint64_t len = atomic_load_explicit(&h->slots[i].len, memory_order_relaxed);
            /* the smallest that fits, else the biggest (it grows the least) */
            int better = best < 0 || (len >= need ? best_len < need || len < best_len
                                                  : best_len < need && len > best_len);
            if (better) {
                best = i;
                best_len = len;
                best_s = st;
            }
        }
        if (best < 0) {
            break;
        }
        uint64_t ns = ((((best_s >> 32) + 1) & PP_Q_PID_MASK) << 32) | me;
        if (atomic_compare_exchange_strong(&h->slots[best].state, &best_s, ns)) {
            *held = ns;
            return best;
        }
    }
    for (int i = 0; i < PP_Q_SLOTS; i++) {
        uint64_t st = atomic_load(&h->slots[i].state);
        uint32_t pid = (uint32_t)(st & PP_Q_PID_MASK);
        if (pid == 0 || pid == me || !pp_proc_dead((pid_t)pid) || pp_slot_queued(r, i, st)) {
            continue;
        }
        uint64_t ns = ((((st >> 32) + 1) & PP_Q_PID_MASK) << 32) | me;
        if (atomic_compare_exchange_strong(&h->slots[i].state, &st, ns)) {
            atomic_fetch_add(&h->reclaims, 1);
            *held = ns;
            return i;
        }
    }
    return -1;
}

/* Gives region i (held in state `held`) back for the next message. Its memory stays allocated
 * (the next message needs no page faults) unless the free regions already keep
 * PP_Q_CACHE_MAX: then it is punched out. */
static void
pp_slot_release(RingObject *r, int i, uint64_t held)
{
    pp_qhdr *h = r->h;
    uint64_t kept = 0;
    for (int j = 0; j < PP_Q_SLOTS; j++) {
        if ((atomic_load_explicit(&h->slots[j].state, memory_order_relaxed) & PP_Q_PID_MASK) == 0) {
            kept += atomic_load_explicit(&h->slots[j].len, memory_order_relaxed);
        }
    }
    uint64_t len = atomic_load(&h->slots[i].len);
    if (len > 0 && kept + len > PP_Q_CACHE_MAX) {
        pp_ring_punch(r, pp_slot_off(h, i), len);
        atomic_store(&h->slots[i].len, 0);
    }
    (void)atomic_compare_exchange_strong(&h->slots[i].state, &held, held & ~PP_Q_PID_MASK);
}

/* Takes a free descriptor for a fresh region (same protocol as the recycled ones): its index,
 * *held set to its new state; -1 when all are in use (the region then goes untracked). */
static int
pp_fresh_claim(RingObject *r, uint64_t *held)
{
    pp_qhdr *h = r->h;
    uint32_t me = pp_self_pid();
    for (int i = PP_Q_SLOTS; i < PP_Q_DESCS; i++) {
        uint64_t st = atomic_load_explicit(&h->slots[i].state, memory_order_relaxed);
        if ((st & PP_Q_PID_MASK) != 0) {
            continue;
        }
        uint64_t ns = ((((st >> 32) + 1) & PP_Q_PID_MASK) << 32) | me;
        if (atomic_compare_exchange_strong(&h->slots[i].state, &st, ns)) {
            *held = ns;
            return i;
        }
    }
    return -1;
}

/* Gives back the region a message used: recycled region `i` (held in state `held`) goes to
 * the next message; a fresh one (descriptor i >= PP_Q_SLOTS, or -1: untracked) at `off` is
 * punched out, then its descriptor freed. */
static void
pp_region_free(RingObject *r, int i, uint64_t held, uint64_t off, uint64_t len)
{
    if (i >= 0 && i < PP_Q_SLOTS) {
        pp_slot_release(r, i, held);
        return;
    }
    pp_ring_punch(r, off, len);
    if (i >= 0) {
        (void)atomic_compare_exchange_strong(&r->h->slots[i].state, &held, held & ~PP_Q_PID_MASK);
    }
}

/* Takes back every region whose holder died (a producer killed before its put committed, a
 * consumer killed while it held the message) and that no message in the ring names: a
 * recycled one goes back to the free ones, a fresh one is punched out. Looks at most every
 * PP_Q_SWEEP_NS (a holder costs a kill(2)); touches no Python object. A holder that is a
 * zombie counts as alive until it is reaped. */
static void
pp_region_sweep(RingObject *r)
{
    pp_qhdr *h = r->h;
    long long now = pp_now_ns();
    uint64_t last = atomic_load_explicit(&h->sweep_ns, memory_order_relaxed);
    if (now - (long long)last < PP_Q_SWEEP_NS ||
        !atomic_compare_exchange_strong(&h->sweep_ns, &last, (uint64_t)now)) {
        return;
    }
    uint32_t me = pp_self_pid();
    for (int i = 0; i < PP_Q_DESCS; i++) {
        uint64_t st = atomic_load(&h->slots[i].state);
        uint32_t pid = (uint32_t)(st & PP_Q_PID_MASK);
        if (pid == 0 || pid == me || kill((pid_t)pid, 0) == 0 || errno != ESRCH ||
            pp_slot_queued(r, i, st)) {
            continue;
        }
        uint64_t off = atomic_load(&h->slots[i].off), len = atomic_load(&h->slots[i].len);
        uint64_t ns = ((((st >> 32) + 1) & PP_Q_PID_MASK) << 32) | me;
        if (atomic_compare_exchange_strong(&h->slots[i].state, &st, ns)) {
            atomic_fetch_add(&h->reclaims, 1);
            pp_region_free(r, i, ns, off, len);
        }
    }
}

/* Where a big message goes: a recycled region, or a fresh one of its own. */
typedef struct {
    uint64_t off, len; /* file offset and length (len 0: none yet) */
    int slot;          /* its descriptor (recycled below PP_Q_SLOTS, else fresh), or -1 */
    uint64_t held;     /* the descriptor's state while this put holds it */
} pp_region;

static inline pp_status
pp_alloc_status(int err)
{
    return (err == ENOSPC || err == ENOMEM || err == EFBIG) ? PP_ERR_NOMEM : PP_ERR_OS;
}

/* Writes the parts into a region (GIL released by the caller: touches no Python object, only
 * the held buffers): a recycled one when the message fits one and one is free, else a new
 * one at a never-used offset of the file, named in a fresh descriptor when one is free. */
static pp_status
pp_heap_write(RingObject *r, pp_parts *p, pp_region *rg, int *err)
{
    pp_qhdr *h = r->h;
    uint64_t need = 0;
    for (Py_ssize_t i = 0; i < p->n; i++) {
        need += pp_q_round((uint64_t)p->bufs[i].len, PP_Q_ALIGN);
    }
    uint64_t len = pp_q_round(need > 0 ? need : 1, 4096);
    pp_region_sweep(r);
    rg->slot = len <= PP_Q_SLOT_MAX ? pp_slot_claim(r, len, &rg->held) : -1;
    char *dst;
    uint64_t off;
    if (rg->slot >= 0) {
        off = pp_slot_off(h, rg->slot);
        uint64_t have = atomic_load(&h->slots[rg->slot].len);
        if (have < len) {
            /* allocate now, so that a full memory gives an error rather than SIGBUS */
            if (fallocate(r->fd, 0, (off_t)(off + have), (off_t)(len - have)) < 0) {
                *err = errno;
                pp_slot_release(r, rg->slot, rg->held);
                rg->slot = -1;
                return pp_alloc_status(*err);
            }
            atomic_store(&h->slots[rg->slot].len, len);
        }
        atomic_fetch_add_explicit(&h->slots[rg->slot].uses, 1, memory_order_relaxed);
        dst = r->base + off;
    }
    else {
        rg->slot = pp_fresh_claim(r, &rg->held);
        off = atomic_fetch_add(&h->heap_next, len);
        if (rg->slot >= 0) {
            /* named before it is allocated, so that a sweep after this process died punches
             * it (len first: a stale length never covers another region) */
            atomic_store(&h->slots[rg->slot].len, 0);
            atomic_store(&h->slots[rg->slot].off, off);
            atomic_store(&h->slots[rg->slot].len, len);
            atomic_fetch_add_explicit(&h->slots[rg->slot].uses, 1, memory_order_relaxed);
        }
        if (fallocate(r->fd, 0, (off_t)off, (off_t)len) < 0) {
            *err = errno;
            pp_region_free(r, rg->slot, rg->held, off, len);
            rg->slot = -1;
            return pp_alloc_status(*err);
        }
        dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, (off_t)off);
        if (dst == MAP_FAILED) {
            *err = errno;
            pp_region_free(r, rg->slot, rg->held, off, len);
            rg->slot = -1;
            return PP_ERR_OS;
        }
    }
    uint64_t at = 0;
    for (Py_ssize_t i = 0; i < p->n; i++) {
        memcpy(dst + at, p->bufs[i].buf, (size_t)p->bufs[i].len);
        at += pp_q_round((uint64_t)p->bufs[i].len, PP_Q_ALIGN);
    }
    if (rg->slot < 0 || rg->slot >= PP_Q_SLOTS) {
        munmap(dst, len);
    }
    rg->off = off;
    rg->len = len;
    return PP_OK;
}

/* Gives back the region of a message that was not put. */
static void
pp_region_drop(RingObject *r, pp_region *rg)
{
    if (rg->len == 0) {
        return;
    }
    pp_region_free(r, rg->slot, rg->held, rg->off, rg->len);
    rg->len = 0;
}

enum { PP_TRY_DONE = 1, PP_TRY_FULL = 0, PP_TRY_BUSY = -2 };

/* Unread payload bytes, as pp_ring_room() counts them: in_bytes is added to by a producer
 * just before its commit (under the put lock, on the put side's cache line) and out_bytes by a
 * consumer just before its commit (under the get lock, on its own line), so a process that
 * dies in between leaves in_bytes too high (a producer) or out_bytes too high (a consumer
 * whose message is taken again). The error never outlives an empty ring: the consumer that
 * empties it evens them (pp_ring_tryget), and an empty ring always has room. */
static inline uint64_t
pp_ring_pending(pp_qhdr *h)
{
    int64_t v = (int64_t)(atomic_load_explicit(&h->in_bytes, memory_order_relaxed) -
                          atomic_load_explicit(&h->out_bytes, memory_order_relaxed));
    return v > 0 ? (uint64_t)v : 0;
}

/* Whether a message of `total` payload bytes may go in now: fewer than `maxsize` (> 0)
 * messages pending, and, with `maxbytes` > 0, the ring empty or its unread bytes staying
 * within maxbytes (so one message bigger than the bound goes in once the reader took the
 * earlier ones). */
static inline int
pp_ring_room(pp_qhdr *h, uint64_t P, uint64_t G, uint64_t maxsize, uint64_t maxbytes,
             uint64_t total)
{
    uint64_t n = pp_q_count(P, G);
    if (maxsize > 0 && n >= maxsize) {
        return 0;
    }
    return maxbytes == 0 || n == 0 || pp_ring_pending(h) + total <= maxbytes;
}

/* One attempt to put (GIL held, nothing allocated). rg->len == 0: inline. */
static int
pp_ring_tryput(RingObject *r, int tag, pp_parts *p, uint64_t maxsize, uint64_t maxbytes,
               const pp_region *rg)
{
    uint64_t heap_len = rg->len;
    pp_qhdr *h = r->h;
    uint64_t W = r->window;
    uint64_t body = 8 * (uint64_t)p->n + (heap_len ? 24 : p->total);
    uint64_t rec = 8 + pp_q_round(body, 8);
    uint32_t me = pp_self_pid();
    if (!pp_q_trylock(&h->plock, me)) {
        return PP_TRY_BUSY;
    }
    uint64_t P = atomic_load_explicit(&h->P, memory_order_relaxed);
    uint64_t G = atomic_load_explicit(&h->G, memory_order_acquire);
    uint64_t F = atomic_load_explicit(&h->F, memory_order_acquire);
    uint64_t tail = P >> PP_Q_CNT_BITS;
    uint64_t off = tail & (W - 1);
    uint64_t pad = off + rec > W ? W - off : 0;
    uint64_t used = (tail - F) & PP_Q_POS_MASK;
    if (!pp_ring_room(h, P, G, maxsize, maxbytes, p->total) || used + pad + rec > W ||
        pp_q_count(P, G) >= (PP_Q_CNT_MASK >> 1)) {
        pp_q_unlock(&h->plock);
        return PP_TRY_FULL;
    }
    if (pad) {
        pp_qrec *padrec = (pp_qrec *)(r->data + off);
        padrec->size = (uint32_t)(pad - 8);
        padrec->kind = PP_REC_PAD;
        padrec->tag = 0;
        padrec->nparts = 0;
        off = 0;
    }
    char *at = r->data + off;
    pp_qrec *hd = (pp_qrec *)at;
    hd->size = (uint32_t)(rec - 8);
    hd->kind = heap_len ? PP_REC_HEAP : PP_REC_INLINE;
    hd->tag = (uint8_t)tag;
    hd->nparts = (uint16_t)p->n;
    uint64_t *words = (uint64_t *)(at + 8);
    if (heap_len) {
        *words++ = rg->off;
        *words++ = heap_len;
        *words++ = rg->slot >= 0 ? pp_slot_ref(rg->slot, rg->held) : 0;
        if (rg->slot >= 0) {
            /* where the message is, for pp_slot_queued(); stored before the commit */
            atomic_store(&h->slots[rg->slot].pos, (tail + pad) & PP_Q_POS_MASK);
        }
    }
    for (Py_ssize_t i = 0; i < p->n; i++) {
        words[i] = (uint64_t)p->bufs[i].len;
    }
    if (!heap_len) {
        char *dst = (char *)(words + p->n);
        for (Py_ssize_t i = 0; i < p->n; i++) {
            memcpy(dst, p->bufs[i].buf, (size_t)p->bufs[i].len);
            dst += p->bufs[i].len;
        }
    }
    uint64_t ntail = (tail + pad + rec) & PP_Q_POS_MASK;
    atomic_store_explicit(&h->in_bytes,
                          atomic_load_explicit(&h->in_bytes, memory_order_relaxed) + p->total,
                          memory_order_relaxed);
    /* The commit: one store makes the record (and its count) visible. */
    atomic_store_explicit(&h->P, (ntail << PP_Q_CNT_BITS) | ((P + 1) & PP_Q_CNT_MASK),
                          memory_order_release);
    pp_q_unlock(&h->plock);
    pp_q_bump(&h->put_seq, &h->get_waiters, 1);
    return PP_TRY_DONE;
}

PyDoc_STRVAR(Ring_put_doc,
             "put($self, tag, parts, block, timeout, maxsize, maxbytes=0, /)\n--\n\n"
             "Appends one message made of `parts` (buffers). False when the ring holds "
             "`maxsize` (> 0) messages, or (`maxbytes` > 0) is not empty and would hold more "
             "than `maxbytes` unread bytes with it, and `block` is false or `timeout` "
             "(< 0: none) passed.");

static PyObject *
Ring_put(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "put() takes 5 or 6 arguments");
        return NULL;
    }
    long tag = PyLong_AsLong(args[0]);
    if (tag == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (tag < 0 || tag > 255) {
        PyErr_SetString(PyExc_ValueError, "tag must be in 0..255");
        return NULL;
    }
    int block = PyObject_IsTrue(args[2]);
    double timeout = PyFloat_AsDouble(args[3]);
    unsigned long long maxsize = PyLong_AsUnsignedLongLong(args[4]);
    unsigned long long maxbytes = nargs > 5 ? PyLong_AsUnsignedLongLong(args[5]) : 0;
    if (block < 0 || PyErr_Occurred()) {
        return NULL;
    }
    pp_parts p;
    if (pp_parts_get(args[1], &p) < 0) {
        return NULL;
    }
    pp_qhdr *h = self->h;
    long long deadline = block ? pp_q_deadline(timeout) : 0;
    pp_region rg = {0, 0, -1, 0};
    uint64_t inline_size = 8 + 8 * (uint64_t)p.n + p.total;
    PyObject *result = NULL;
    for (;;) {
        uint32_t seen = atomic_load(&h->get_seq);
        if (inline_size > PP_Q_INLINE_MAX && rg.len == 0) {
            /* Big message: write it out of the lock, once there is room for it. */
            uint64_t P = atomic_load(&h->P), G = atomic_load(&h->G);
            if (pp_ring_room(h, P, G, maxsize, maxbytes, p.total)) {
                pp_status st;
                int err = 0;
                Py_BEGIN_ALLOW_THREADS
                st = pp_heap_write(self, &p, &rg, &err);
                Py_END_ALLOW_THREADS
                if (st != PP_OK) {
                    pp_raise(st, err);
                    goto done;
                }
            }
        }
        int r = PP_TRY_FULL;
        if (inline_size <= PP_Q_INLINE_MAX || rg.len != 0) {
            r = pp_ring_tryput(self, (int)tag, &p, maxsize, maxbytes, &rg);
        }
        if (r == PP_TRY_DONE) {
            rg.len = 0; /* the region belongs to the message now */
            result = Py_NewRef(Py_True);
            goto done;
        }
        pp_status st;
        if (r == PP_TRY_BUSY) {
            Py_BEGIN_ALLOW_THREADS
            st = pp_q_lock_wait(h, &h->plock, block ? deadline : -1);
            Py_END_ALLOW_THREADS
        }
        else if (!block) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        else {
            Py_BEGIN_ALLOW_THREADS
            st = pp_q_wait_word(&h->get_seq, seen, &h->put_waiters, deadline, &self->gate);
            Py_END_ALLOW_THREADS
        }
        if (st == PP_ERR_TIMEOUT) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        if (PyErr_CheckSignals() < 0) {
            goto done;
        }
    }
done:
    pp_region_drop(self, &rg);
    pp_parts_release(&p);
    return result;
}

/* One attempt to get (GIL held). On PP_TRY_DONE, *tag_out and the parts are set: `objs` holds
 * nparts new bytes/bytearray objects (inline) or one RingBlock (heap), with `lens` (in the
 * local arrays for up to PP_Q_LOCAL_PARTS parts). */
typedef struct {
    int tag;
    int heap;
    Py_ssize_t n;
    PyObject **objs;
    uint64_t *lens;
    PyObject *local_objs[PP_Q_LOCAL_PARTS];
    uint64_t local_lens[PP_Q_LOCAL_PARTS];
} pp_got;

static void
pp_got_clear(pp_got *g)
{
    if (g->objs != NULL) {
        for (Py_ssize_t i = 0; i < g->n; i++) {
            Py_XDECREF(g->objs[i]);
        }
    }
    if (g->objs != g->local_objs) {
        PyMem_Free(g->objs);
    }
    if (g->lens != g->local_lens) {
        PyMem_Free(g->lens);
    }
    g->objs = NULL;
    g->lens = NULL;
    g->n = 0;
}

static int
pp_ring_tryget(RingObject *r, pp_got *g)
{
    pp_qhdr *h = r->h;
    uint64_t W = r->window;
    uint32_t me = pp_self_pid();
    if (!pp_q_trylock(&h->glock, me)) {
        return PP_TRY_BUSY;
    }
    uint64_t G = atomic_load_explicit(&h->G, memory_order_relaxed);
    uint64_t P = atomic_load_explicit(&h->P, memory_order_acquire);
    if (pp_q_count(P, G) == 0) {
        pp_q_unlock(&h->glock);
        return PP_TRY_FULL; /* empty */
    }
    uint64_t head = G >> PP_Q_CNT_BITS;
    uint64_t off = head & (W - 1);
    pp_qrec *hd = (pp_qrec *)(r->data + off);
    if (hd->kind == PP_REC_PAD) {
        head = (head + 8 + hd->size) & PP_Q_POS_MASK;
        off = 0;
        hd = (pp_qrec *)r->data;
    }
    uint64_t *words = (uint64_t *)(hd + 1);
    Py_ssize_t n = hd->nparts;
    int heap = hd->kind == PP_REC_HEAP;
    if ((hd->kind != PP_REC_INLINE && !heap) || n < 1 || off + 8 + hd->size > W) {
        pp_q_unlock(&h->glock);
        PyErr_SetString(PyExc_RuntimeError, "queue memory is corrupted");
        return -1;
    }
    g->tag = hd->tag;
    g->heap = heap;
    if (n <= PP_Q_LOCAL_PARTS) {
        memset(g->local_objs, 0, sizeof(g->local_objs));
        g->objs = g->local_objs;
        g->lens = g->local_lens;
    }
    else {
        g->objs = PyMem_Calloc((size_t)n, sizeof(PyObject *));
        g->lens = PyMem_Calloc((size_t)n, sizeof(uint64_t));
        if (g->objs == NULL || g->lens == NULL) {
            goto nomem;
        }
    }
    g->n = n;
    uint64_t *lens = words + (heap ? 3 : 0);
    memcpy(g->lens, lens, (size_t)n * sizeof(uint64_t));
    if (heap) {
        uint64_t hoff = words[0], hlen = words[1], ref = words[2];
        int slot = -1;
        uint64_t held = 0;
        char *addr;
        if (ref != 0) {
            /* A region with a descriptor: this process becomes its holder before the get
             * commits, so that it is never seen both unheld and out of the ring. */
            slot = (int)((ref & PP_Q_PID_MASK) - 1);
            int bad = slot < 0 || slot >= PP_Q_DESCS;
            if (!bad && slot < PP_Q_SLOTS) {
                bad = hoff != pp_slot_off(h, slot) || hlen > PP_Q_SLOT_MAX;
            }
            else if (!bad) {
                bad = hoff != atomic_load(&h->slots[slot].off) ||
                      hlen != atomic_load(&h->slots[slot].len);
            }
            if (bad ||
                (atomic_load(&h->slots[slot].state) & ~PP_Q_PID_MASK) != (ref & ~PP_Q_PID_MASK)) {
                pp_q_unlock(&h->glock);
                pp_got_clear(g);
                PyErr_SetString(PyExc_RuntimeError, "queue memory is corrupted");
                return -1;
            }
            held = (ref & ~PP_Q_PID_MASK) | me;
            atomic_store(&h->slots[slot].state, held);
        }
        if (slot >= 0 && slot < PP_Q_SLOTS) {
            addr = r->base + hoff; /* a recycled region: mapped already */
        }
        else {
            addr = mmap(NULL, hlen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                        (off_t)hoff);
        }
        if (addr == MAP_FAILED) {
            int err = errno;
            pp_q_unlock(&h->glock);
            pp_got_clear(g);
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        /* RingBlock is not a GC type: allocating it cannot run Python code. */
        RingBlockObject *b = (RingBlockObject *)((PyTypeObject *)r->block_type)
                                 ->tp_alloc((PyTypeObject *)r->block_type, 0);
        if (b == NULL) {
            if (slot < 0 || slot >= PP_Q_SLOTS) {
                munmap(addr, hlen);
            } /* the region stays with the message, which is not taken */
            goto nomem;
        }
        b->ring = (RingObject *)Py_NewRef(r);
        b->addr = addr;
        b->len = hlen;
        b->off = hoff;
        b->slot = slot;
        b->owner = me;
        b->held = held;
        g->objs[0] = (PyObject *)b;
    }
    else {
        const char *src = (const char *)(lens + n);
        for (Py_ssize_t i = 0; i < n; i++) {
            /* bytes and bytearray are not GC types either */
            g->objs[i] = i == 0 ? PyBytes_FromStringAndSize(src, (Py_ssize_t)g->lens[i])
                                : PyByteArray_FromStringAndSize(src, (Py_ssize_t)g->lens[i]);
            if (g->objs[i] == NULL) {
                goto nomem;
            }
            src += g->lens[i];
        }
    }
    uint64_t nhead = (head + 8 + hd->size) & PP_Q_POS_MASK;
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        total += g->lens[i];
    }
    uint64_t in = atomic_load_explicit(&h->in_bytes, memory_order_relaxed);
    uint64_t out = atomic_load_explicit(&h->out_bytes, memory_order_relaxed) + total;
    atomic_store_explicit(&h->out_bytes, out, memory_order_relaxed);
    /* The commit. */
    atomic_store_explicit(&h->G, (nhead << PP_Q_CNT_BITS) | ((G + 1) & PP_Q_CNT_MASK),
                          memory_order_release);
    if (in != out && (P & PP_Q_CNT_MASK) == ((G + 1) & PP_Q_CNT_MASK)) {
        /* This get emptied the ring, yet the byte counts differ (a process died between its
         * count and its commit): even them, under the put lock so that no put is counted
         * meanwhile (a lock that is busy leaves it for the next time). */
        if (pp_q_trylock(&h->plock, me)) {
            if (pp_q_count(atomic_load(&h->P), atomic_load(&h->G)) == 0) {
                atomic_store(&h->out_bytes, atomic_load(&h->in_bytes));
            }
            pp_q_unlock(&h->plock);
        }
    }
    /* Give back whole blocks below head (also those a dead consumer left behind). */
    uint64_t F = atomic_load_explicit(&h->F, memory_order_relaxed);
    while (((nhead - F) & PP_Q_POS_MASK) >= PP_Q_BLOCK) {
        pp_ring_punch(r, PP_Q_DATA_OFF + (F & (W - 1)), PP_Q_BLOCK);
        F = (F + PP_Q_BLOCK) & PP_Q_POS_MASK;
        atomic_store_explicit(&h->F, F, memory_order_release);
    }
    pp_q_unlock(&h->glock);
    pp_q_bump(&h->get_seq, &h->put_waiters, 1);
    return PP_TRY_DONE;
nomem:
    pp_q_unlock(&h->glock);
    pp_got_clear(g);
    PyErr_NoMemory();
    return -1;
}

/* (tag, [parts]) for a message taken off the ring; steals g's objects. */
static PyObject *
pp_got_result(pp_got *g)
{
    PyObject *py_parts = PyList_New(g->n);
    PyObject *py_view = NULL, *res = NULL;
    if (py_parts == NULL) {
        goto error;
    }
    if (g->heap) {
        py_view = PyMemoryView_FromObject(g->objs[0]);
        if (py_view == NULL) {
            goto error;
        }
        uint64_t at = 0;
        for (Py_ssize_t i = 0; i < g->n; i++) {
            PyObject *start = PyLong_FromUnsignedLongLong(at);
            PyObject *stop = PyLong_FromUnsignedLongLong(at + g->lens[i]);
            PyObject *slice = start && stop ? PySlice_New(start, stop, NULL) : NULL;
            Py_XDECREF(start);
            Py_XDECREF(stop);
            if (slice == NULL) {
                goto error;
            }
            PyObject *item = PyObject_GetItem(py_view, slice);
            Py_DECREF(slice);
            if (item == NULL) {
                goto error;
            }
            PyList_SET_ITEM(py_parts, i, item); /* steals */
            at += pp_q_round(g->lens[i], PP_Q_ALIGN);
        }
    }
    else {
        for (Py_ssize_t i = 0; i < g->n; i++) {
            PyList_SET_ITEM(py_parts, i, g->objs[i]); /* steals */
            g->objs[i] = NULL;
        }
    }
    PyObject *tag = PyLong_FromLong(g->tag);
    if (tag == NULL) {
        goto error;
    }
    res = PyTuple_New(2);
    if (res == NULL) {
        Py_DECREF(tag);
        goto error;
    }
    PyTuple_SET_ITEM(res, 0, tag);      /* steals */
    PyTuple_SET_ITEM(res, 1, py_parts); /* steals */
    py_parts = NULL;
error:
    Py_XDECREF(py_parts);
    Py_XDECREF(py_view);
    pp_got_clear(g);
    return res;
}

PyDoc_STRVAR(Ring_get_doc, "get($self, block, timeout, /)\n--\n\n"
                           "Takes the oldest message: (tag, parts), or None when the ring is "
                           "empty and `block` is false or `timeout` (< 0: none) passed.");

static PyObject *
Ring_get(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get() takes 2 arguments");
        return NULL;
    }
    int block = PyObject_IsTrue(args[0]);
    double timeout = PyFloat_AsDouble(args[1]);
    if (block < 0 || PyErr_Occurred()) {
        return NULL;
    }
    pp_qhdr *h = self->h;
    long long deadline = block ? pp_q_deadline(timeout) : 0;
    for (;;) {
        uint32_t seen = atomic_load(&h->put_seq);
        pp_got g = {0};
        int r = pp_ring_tryget(self, &g);
        if (r == PP_TRY_DONE) {
            return pp_got_result(&g);
        }
        if (r == -1) {
            return NULL;
        }
        pp_status st;
        if (r == PP_TRY_BUSY) {
            Py_BEGIN_ALLOW_THREADS
            st = pp_q_lock_wait(h, &h->glock, block ? deadline : -1);
            Py_END_ALLOW_THREADS
        }
        else if (!block) {
            Py_RETURN_NONE;
        }
        else {
            Py_BEGIN_ALLOW_THREADS
            st = pp_q_wait_word(&h->put_seq, seen, &h->get_waiters, deadline, &self->gate);
            Py_END_ALLOW_THREADS
        }
        if (st == PP_ERR_TIMEOUT) {
            Py_RETURN_NONE;
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
}

PyDoc_STRVAR(Ring_qsize_doc, "qsize($self, /)\n--\n\nMessages in the ring (exact).");

static PyObject *
Ring_qsize(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t G = atomic_load(&self->h->G);
    uint64_t P = atomic_load(&self->h->P);
    return PyLong_FromUnsignedLongLong(pp_q_count(P, G));
}

PyDoc_STRVAR(Ring_task_done_doc,
             "task_done($self, /)\n--\n\n"
             "Counts one finished task; ValueError when there is no unfinished one.");

static PyObject *
Ring_task_done(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    pp_qhdr *h = self->h;
    uint32_t d = atomic_load(&h->done);
    for (;;) {
        uint64_t P = atomic_load(&h->P);
        uint64_t unfinished = ((P & PP_Q_CNT_MASK) - d) & PP_Q_CNT_MASK;
        if (unfinished == 0) {
            PyErr_SetString(PyExc_ValueError, "task_done() called too many times");
            return NULL;
        }
        uint32_t nd = (uint32_t)((d + 1) & PP_Q_CNT_MASK);
        if (atomic_compare_exchange_weak(&h->done, &d, nd)) {
            if (unfinished == 1 && atomic_load(&h->join_waiters) != 0) {
                pp_futex_wake(&h->done, INT_MAX);
            }
            Py_RETURN_NONE;
        }
    }
}

PyDoc_STRVAR(Ring_unfinished_doc, "unfinished($self, /)\n--\n\n"
                                  "Messages put and not yet marked done by task_done().");

static PyObject *
Ring_unfinished(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    uint32_t d = atomic_load(&self->h->done);
    uint64_t P = atomic_load(&self->h->P);
    return PyLong_FromUnsignedLongLong(((P & PP_Q_CNT_MASK) - d) & PP_Q_CNT_MASK);
}

PyDoc_STRVAR(Ring_join_doc, "join($self, timeout, /)\n--\n\n"
                            "Waits until every message put was marked done; False on timeout.");

static PyObject *
Ring_join(RingObject *self, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    pp_qhdr *h = self->h;
    long long deadline = pp_q_deadline(timeout);
    for (;;) {
        uint32_t d = atomic_load(&h->done);
        uint64_t P = atomic_load(&h->P);
        if ((((P & PP_Q_CNT_MASK) - d) & PP_Q_CNT_MASK) == 0) {
            Py_RETURN_TRUE;
        }
        pp_status st;
        Py_BEGIN_ALLOW_THREADS
        st = pp_q_wait_word(&h->done, d, &h->join_waiters, deadline, &self->gate);
        Py_END_ALLOW_THREADS
        if (st == PP_ERR_TIMEOUT) {
            Py_RETURN_FALSE;
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
}

PyDoc_STRVAR(Ring_stats_doc, "stats($self, /)\n--\n\n"
                             "Internal counters, for tests: a dict.");

static PyObject *
Ring_stats(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    pp_qhdr *h = self->h;
    uint64_t P = atomic_load(&h->P), G = atomic_load(&h->G);
    unsigned long long slot_bytes = 0, slot_uses = 0, slots_free = 0;
    for (int i = 0; i < PP_Q_SLOTS; i++) {
        slot_bytes += atomic_load(&h->slots[i].len);
        slot_uses += atomic_load(&h->slots[i].uses);
        slots_free += (atomic_load(&h->slots[i].state) & PP_Q_PID_MASK) == 0;
    }
    unsigned long long fresh = atomic_load(&h->heap_next) - h->heap_base, fresh_held = 0;
    for (int i = PP_Q_SLOTS; i < PP_Q_DESCS; i++) {
        fresh_held += (atomic_load(&h->slots[i].state) & PP_Q_PID_MASK) != 0;
    }
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsIsLsK}", "tail", (unsigned long long)(P >> PP_Q_CNT_BITS),
        "head", (unsigned long long)(G >> PP_Q_CNT_BITS), "freed",
        (unsigned long long)atomic_load(&h->F), "puts", (unsigned long long)(P & PP_Q_CNT_MASK),
        "gets", (unsigned long long)(G & PP_Q_CNT_MASK), "heap_used", fresh + slot_bytes,
        "fresh_used", fresh, "slot_bytes", slot_bytes, "slot_uses", slot_uses, "slots_free",
        slots_free, "reclaims", (unsigned long long)atomic_load(&h->reclaims), "recoveries",
        (unsigned long long)atomic_load(&h->recoveries), "window", (unsigned long long)self->window,
        "put_lock", (unsigned int)atomic_load(&h->plock.word), "pending",
        (long long)(atomic_load(&h->in_bytes) - atomic_load(&h->out_bytes)), "fresh_held",
        fresh_held);
}

PyDoc_STRVAR(Ring_slot_doc, "_slot_for_test($self, index, pid, /)\n--\n\n"
                            "Makes process `pid` the holder of recycled region `index` (in a new "
                            "generation, carried by no message). Tests use it to leave a region "
                            "held by a dead process.");

static PyObject *
Ring_slot_for_test(RingObject *self, PyObject *args)
{
    int index;
    unsigned int pid;
    if (!PyArg_ParseTuple(args, "iI:_slot_for_test", &index, &pid)) {
        return NULL;
    }
    if (index < 0 || index >= PP_Q_SLOTS) {
        PyErr_SetString(PyExc_IndexError, "no such region");
        return NULL;
    }
    pp_qslot *sl = &self->h->slots[index];
    uint64_t st = atomic_load(&sl->state);
    atomic_store(&sl->state, ((((st >> 32) + 1) & PP_Q_PID_MASK) << 32) | pid);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Ring_write_doc, "_write_for_test($self, parts, /)\n--\n\n"
                             "Writes a big message's region as put() does and stops before the "
                             "commit, leaving it held by this process: what a producer killed "
                             "mid-put leaves. Returns its descriptor index (-1: untracked).");

static PyObject *
Ring_write_for_test(RingObject *self, PyObject *arg)
{
    pp_parts p;
    if (pp_parts_get(arg, &p) < 0) {
        return NULL;
    }
    pp_region rg = {0, 0, -1, 0};
    int err = 0;
    pp_status st;
    Py_BEGIN_ALLOW_THREADS
    st = pp_heap_write(self, &p, &rg, &err);
    Py_END_ALLOW_THREADS
    pp_parts_release(&p);
    if (st != PP_OK) {
        return pp_raise(st, err);
    }
    return PyLong_FromLong(rg.slot);
}

PyDoc_STRVAR(Ring_lock_doc, "_lock_for_test($self, which, pid, /)\n--\n\n"
                            "Stores `pid` as the owner of the put (0) or get (1) lock. Tests "
                            "use it to leave a lock held by a dead process.");

static PyObject *
Ring_lock_for_test(RingObject *self, PyObject *args)
{
    int which;
    unsigned int pid;
    if (!PyArg_ParseTuple(args, "iI:_lock_for_test", &which, &pid)) {
        return NULL;
    }
    pp_qlock *l = which ? &self->h->glock : &self->h->plock;
    atomic_store(&l->word, pid);
    Py_RETURN_NONE;
}

static PyObject *
Ring_get_ino(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->ino);
}

static PyMethodDef Ring_methods[] = {
    {"attach", Ring_attach, METH_VARARGS | METH_CLASS, Ring_attach_doc},
    {"put", (PyCFunction)(void (*)(void))Ring_put, METH_FASTCALL, Ring_put_doc},
    {"get", (PyCFunction)(void (*)(void))Ring_get, METH_FASTCALL, Ring_get_doc},
    {"qsize", (PyCFunction)Ring_qsize, METH_NOARGS, Ring_qsize_doc},
    {"task_done", (PyCFunction)Ring_task_done, METH_NOARGS, Ring_task_done_doc},
    {"unfinished", (PyCFunction)Ring_unfinished, METH_NOARGS, Ring_unfinished_doc},
    {"join", (PyCFunction)Ring_join, METH_O, Ring_join_doc},
    {"stats", (PyCFunction)Ring_stats, METH_NOARGS, Ring_stats_doc},
    {"_lock_for_test", (PyCFunction)Ring_lock_for_test, METH_VARARGS, Ring_lock_doc},
    {"_slot_for_test", (PyCFunction)Ring_slot_for_test, METH_VARARGS, Ring_slot_doc},
    {"_write_for_test", (PyCFunction)Ring_write_for_test, METH_O, Ring_write_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"ino", (getter)Ring_get_ino, NULL, "inode of the memfd (identifies the ring)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_INT T_INT
#define Py_READONLY READONLY
#endif

static PyMemberDef Ring_members[] = {
    {"fd", Py_T_INT, offsetof(RingObject, fd), Py_READONLY, "the ring's fd in this process"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Ring_slots[] = {
    {Py_tp_new, Ring_new},
    {Py_tp_dealloc, Ring_dealloc},
    {Py_tp_methods, Ring_methods},
    {Py_tp_getset, Ring_getset},
    {Py_tp_members, Ring_members},
    {Py_tp_doc, (void *)"Ring(window=4 GiB)\n--\n\nA shared-memory message queue (see queue.c)."},
    {0, NULL},
};

static PyType_Spec Ring_spec = {
    .name = "pyparallel._core.Ring",
    .basicsize = sizeof(RingObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Ring_slots,
};

/* ---- RingBlock: a big message's heap region, mapped; freed with its last view ---- */

static void
RingBlock_dealloc(RingBlockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->addr != NULL) {
        /* Only the process that took the message gives its region back (not a child that
         * inherited this block by fork while the parent still uses the region). */
        int mine = self->owner == pp_self_pid();
        if (self->slot < 0 || self->slot >= PP_Q_SLOTS) {
            munmap(self->addr, self->len); /* a fresh region, mapped for this block */
        }
        if (mine) {
            pp_region_free(self->ring, self->slot, self->held, self->off, self->len);
            pp_region_sweep(self->ring);
        }
    }
    Py_XDECREF(self->ring);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
RingBlock_getbuffer(RingBlockObject *self, Py_buffer *view, int flags)
{
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr, (Py_ssize_t)self->len, 0, flags) <
        0) {
        return -1;
    }
    self->exports++;
    return 0;
}

static void
RingBlock_releasebuffer(RingBlockObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

static PyObject *
RingBlock_new(PyTypeObject *Py_UNUSED(type), PyObject *Py_UNUSED(a), PyObject *Py_UNUSED(k))
{
    PyErr_SetString(PyExc_TypeError, "RingBlock objects come from Ring.get()");
    return NULL;
}

static PyType_Slot RingBlock_slots[] = {
    {Py_tp_new, RingBlock_new},
    {Py_tp_dealloc, RingBlock_dealloc},
    {Py_bf_getbuffer, RingBlock_getbuffer},
    {Py_bf_releasebuffer, RingBlock_releasebuffer},
    {Py_tp_doc, (void *)"A received big message, read in place in shared memory."},
    {0, NULL},
};

static PyType_Spec RingBlock_spec = {
    .name = "pyparallel._core.RingBlock",
    .basicsize = sizeof(RingBlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = RingBlock_slots,
};

int
pp_queue_exec(PyObject *module, pp_state *Py_UNUSED(st))
{
    PyObject *bt = PyType_FromModuleAndSpec(module, &RingBlock_spec, NULL);
    if (bt == NULL || PyModule_AddObjectRef(module, "RingBlock", bt) < 0) {
        Py_XDECREF(bt);
        return -1;
    }
    Py_DECREF(bt);
    PyObject *rt = PyType_FromModuleAndSpec(module, &Ring_spec, NULL);
    if (rt == NULL || PyModule_AddObjectRef(module, "Ring", rt) < 0) {
        Py_XDECREF(rt);
        return -1;
    }
    Py_DECREF(rt);
    if (PyModule_AddIntConstant(module, "RING_SLOTS", PP_Q_SLOTS) < 0 ||
        PyModule_AddIntConstant(module, "RING_SLOT_MAX", (long)PP_Q_SLOT_MAX) < 0 ||
        PyModule_AddIntConstant(module, "RING_CACHE_MAX", (long)PP_Q_CACHE_MAX) < 0) {
        return -1;
    }
    return PyModule_AddIntConstant(module, "RING_INLINE_MAX", PP_Q_INLINE_MAX);
}
