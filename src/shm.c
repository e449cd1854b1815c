/* shm.c: shared memory segments (memfd, no name in /dev/shm) and SharedView, a typed window on
 * a segment with the buffer protocol and lock-free atomic operations on its items.
 *
 * A Segment owns one memfd and one MAP_SHARED mapping of it. Another process attaches by
 * opening /proc/<pid>/fd/<fd> of any living process that holds the segment (checked against
 * the inode recorded in the handle, so a recycled fd number is never mistaken for it). The
 * kernel frees the memory when the last fd and the last mapping, in any process, are gone.
 *
 * Shared memory holds only data and C11 atomics; nothing in it is a pointer. */
#include "pp.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <unistd.h>
#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_T_INT T_INT
#define Py_READONLY READONLY
#endif

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

/* ------------------------------------------------------------------------------------------
 * Segment */

typedef struct {
    PyObject_HEAD
    int fd;
    Py_ssize_t size;
    char *addr;
    Py_ssize_t exports; /* live buffer exports; the mapping stays while any exist */
    unsigned long long ino;
    PyObject *weakreflist;
} SegmentObject;

/* Creates an anonymous memfd of `size` bytes (zero-filled); -1 with errno on failure. */
static int
pp_memfd_create(Py_ssize_t size)
{
#ifdef SYS_memfd_create
    int fd = (int)syscall(SYS_memfd_create, "pyparallel", MFD_CLOEXEC);
#else
    int fd = memfd_create("pyparallel", MFD_CLOEXEC);
#endif
    if (fd < 0) {
        return -1;
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

/* Maps `fd` shared read-write and fills the segment; on failure closes fd and sets errno. */
static pp_status
pp_segment_map(SegmentObject *self, int fd, Py_ssize_t size)
{
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return PP_ERR_OS;
    }
    /* A zero-length mapping is invalid; keep one page for empty arrays. */
    size_t len = size > 0 ? (size_t)size : 1;
    void *addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (addr == MAP_FAILED) {
        int err = errno;
        close(fd);
        errno = err;
        return PP_ERR_OS;
    }
    self->fd = fd;
    self->size = size;
    self->addr = addr;
    self->ino = (unsigned long long)sb.st_ino;
    return PP_OK;
}

static SegmentObject *
pp_segment_alloc(PyTypeObject *type)
{
    SegmentObject *self = (SegmentObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->fd = -1;
        self->addr = NULL;
    }
    return self;
}

/* 0 when `size` bytes fit in this machine's memory and swap together; otherwise -1 with
 * OSError(ENOMEM) set. A memfd of any size is created and mapped at once (sparse), and its
 * pages would fail (SIGBUS) only when touched: a segment that can never be backed is refused
 * before anything is allocated, with the exception multiprocessing raises for it. */
static int
pp_segment_fits(Py_ssize_t size)
{
    struct sysinfo si;
    if (sysinfo(&si) != 0) {
        return 0; /* unknown: let the allocation itself decide */
    }
    unsigned long long total =
        ((unsigned long long)si.totalram + (unsigned long long)si.totalswap) *
        (unsigned long long)(si.mem_unit ? si.mem_unit : 1);
    if ((unsigned long long)size <= total) {
        return 0;
    }
    PyObject *exc = PyObject_CallFunction(
        PyExc_OSError, "is", ENOMEM,
        "Cannot allocate memory: a shared segment larger than this machine's memory and swap");
    if (exc != NULL) {
        PyErr_SetObject(PyExc_OSError, exc);
        Py_DECREF(exc);
    }
    return -1;
}

/* Segment(size): a new zero-filled segment of `size` bytes. */
static PyObject *
Segment_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_ssize_t size;
    static char *kwlist[] = {"size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:Segment", kwlist, &size)) {
        return NULL;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "segment size must be >= 0");
        return NULL;
    }
    if (pp_segment_fits(size) < 0) {
        return NULL;
    }
    SegmentObject *self = pp_segment_alloc(type);
    if (self == NULL) {
        return NULL;
    }
    int fd = pp_memfd_create(size > 0 ? size : 1);
    if (fd < 0 || pp_segment_map(self, fd, size) != PP_OK) {
        int err = errno;
        Py_DECREF(self);
        return pp_raise(PP_ERR_OS, err); /* OSError, as multiprocessing's ftruncate/mmap */
    }
    return (PyObject *)self;
}

/* Opens the file that process `pid` holds as `fd` (a shared object it sent by handle) and
 * checks that it is still inode `ino` of at least `min_size` bytes. Returns the new
 * descriptor, or -1 with an exception set: FileNotFoundError naming `what` when the process
 * no longer holds it (`sender`: what the sending process must keep alive). */
int
pp_open_peer_fd(long pid, int fd, unsigned long long ino, Py_ssize_t min_size, const char *what,
                const char *sender)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/fd/%d", pid, fd);
    int nfd;
    Py_BEGIN_ALLOW_THREADS
    nfd = open(path, O_RDWR | O_CLOEXEC);
    Py_END_ALLOW_THREADS
    if (nfd < 0) {
        int err = errno;
        if (err == ENOENT || err == ESRCH) {
            PyErr_Format(PyExc_FileNotFoundError,
                         "%s is gone: process %ld no longer holds it (the process that sends "
                         "%s must keep it alive until it is received)",
                         what, pid, sender);
            return -1;
        }
        errno = err;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        return -1;
    }
    struct stat sb;
    if (fstat(nfd, &sb) < 0 || (unsigned long long)sb.st_ino != ino || sb.st_size < min_size) {
        close(nfd);
        PyErr_Format(PyExc_FileNotFoundError,
                     "%s is gone: fd %d of process %ld is another file now", what, fd, pid);
        return -1;
    }
    return nfd;
}

PyDoc_STRVAR(Segment_attach_doc, "attach($type, pid, fd, ino, size, /)\n--\n\n"
                                 "Maps the segment that process `pid` holds as `fd` (its inode "
                                 "must be `ino`, its size at least `size`).");

static PyObject *
Segment_attach(PyObject *cls, PyObject *args)
{
    long pid;
    int fd;
    unsigned long long ino;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "liKn:attach", &pid, &fd, &ino, &size)) {
        return NULL;
    }
    if (size < 0 || fd < 0 || pid <= 0) {
        PyErr_SetString(PyExc_ValueError, "invalid segment handle");
        return NULL;
    }
    int nfd = pp_open_peer_fd(pid, fd, ino, size, "shared segment", "a shared object");
    if (nfd < 0) {
        return NULL;
    }
    SegmentObject *self = pp_segment_alloc((PyTypeObject *)cls);
    if (self == NULL) {
        close(nfd);
        return NULL;
    }
    if (pp_segment_map(self, nfd, size) != PP_OK) {
        int err = errno;
        Py_DECREF(self);
        return pp_raise(PP_ERR_OS, err);
    }
    return (PyObject *)self;
}

static void
Segment_dealloc(SegmentObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    if (self->addr != NULL) {
        munmap(self->addr, self->size > 0 ? (size_t)self->size : 1);
    }
    if (self->fd >= 0) {
        close(self->fd);
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
Segment_getbuffer(SegmentObject *self, Py_buffer *view, int flags)
{
    if (self->addr == NULL) {
        PyErr_SetString(PyExc_ValueError, "segment is closed");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr, self->size, 0, flags) < 0) {
        return -1;
    }
    self->exports++;
    return 0;
}

static void
Segment_releasebuffer(SegmentObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

PyDoc_STRVAR(Segment_close_doc, "close($self, /)\n--\n\n"
                                "Unmaps the segment and closes its fd now (BufferError while "
                                "views of it exist).");

static PyObject *
Segment_close(SegmentObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "cannot close a segment while views of it exist");
        return NULL;
    }
    if (self->addr != NULL) {
        munmap(self->addr, self->size > 0 ? (size_t)self->size : 1);
        self->addr = NULL;
    }
    if (self->fd >= 0) {
        close(self->fd);
        self->fd = -1;
    }
    Py_RETURN_NONE;
}

/* Checks that [offset, offset + len) lies in an open segment; -1 with an exception if not. */
static int
pp_segment_range(SegmentObject *self, Py_ssize_t offset, Py_ssize_t len)
{
    if (self->addr == NULL) {
        PyErr_SetString(PyExc_ValueError, "segment is closed");
        return -1;
    }
    if (offset < 0 || len < 0 || offset > self->size - len) {
        PyErr_SetString(PyExc_IndexError, "segment range out of bounds");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(Segment_write_doc, "write($self, offset, data, /)\n--\n\n"
                                "Copies the bytes of buffer `data` into the segment at `offset` "
                                "(the GIL is released for large copies).");

static PyObject *
Segment_write(SegmentObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write(offset, data)");
        return NULL;
    }
    Py_ssize_t offset = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer src;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (pp_segment_range(self, offset, src.len) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    char *dst = self->addr + offset;
    if (src.len >= PP_TUNE_NOGIL_COPY) {
        /* Counted as an export meanwhile, so that another thread's close() cannot unmap it. */
        self->exports++;
        Py_BEGIN_ALLOW_THREADS
        memcpy(dst, src.buf, (size_t)src.len);
        Py_END_ALLOW_THREADS
        self->exports--;
    }
    else {
        memcpy(dst, src.buf, (size_t)src.len);
    }
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

/* The aligned 32-bit word at `offset` for load32/store32/release; NULL with an exception. */
static _Atomic uint32_t *
pp_segment_word(SegmentObject *self, PyObject *arg)
{
    Py_ssize_t offset = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (offset % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "a 32-bit word's offset must be a multiple of 4");
        return NULL;
    }
    if (pp_segment_range(self, offset, 4) < 0) {
        return NULL;
    }
    return (_Atomic uint32_t *)(void *)(self->addr + offset);
}

PyDoc_STRVAR(Segment_load32_doc, "load32($self, offset, /)\n--\n\n"
                                 "Atomically reads the unsigned 32-bit word at `offset`.");

static PyObject *
Segment_load32(SegmentObject *self, PyObject *arg)
{
    _Atomic uint32_t *w = pp_segment_word(self, arg);
    return w == NULL ? NULL : PyLong_FromUnsignedLong(atomic_load(w));
}

PyDoc_STRVAR(Segment_store32_doc, "store32($self, offset, value, /)\n--\n\n"
                                  "Atomically writes the unsigned 32-bit word at `offset`.");

static PyObject *
Segment_store32(SegmentObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store32(offset, value)");
        return NULL;
    }
    _Atomic uint32_t *w = pp_segment_word(self, args[0]);
    if (w == NULL) {
        return NULL;
    }
    unsigned long v = PyLong_AsUnsignedLong(args[1]);
    if (v == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (v > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit in 32 bits");
        return NULL;
    }
    atomic_store(w, (uint32_t)v);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Segment_release_doc,
             "release($self, offset, /)\n--\n\n"
             "When no view of the segment exists any more (in this process): atomically "
             "writes 0 to the 32-bit word at `offset` and returns True; otherwise changes "
             "nothing and returns False. (A pool worker tells the parent this way that it may "
             "write into the segment again.)");

static PyObject *
Segment_release(SegmentObject *self, PyObject *arg)
{
    _Atomic uint32_t *w = pp_segment_word(self, arg);
    if (w == NULL) {
        return NULL;
    }
    if (self->exports > 0) {
        Py_RETURN_FALSE;
    }
    atomic_store(w, 0);
    Py_RETURN_TRUE;
}

static PyObject *
Segment_get_ino(SegmentObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->ino);
}

static PyObject *
Segment_get_closed(SegmentObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->addr == NULL);
}

static PyObject *
Segment_repr(SegmentObject *self)
{
    return PyUnicode_FromFormat("<pyparallel Segment fd=%d size=%zd>", self->fd, self->size);
}

static PyMethodDef Segment_methods[] = {
    {"attach", Segment_attach, METH_VARARGS | METH_CLASS, Segment_attach_doc},
    {"close", (PyCFunction)Segment_close, METH_NOARGS, Segment_close_doc},
    {"write", (PyCFunction)(void (*)(void))Segment_write, METH_FASTCALL, Segment_write_doc},
    {"load32", (PyCFunction)Segment_load32, METH_O, Segment_load32_doc},
    {"store32", (PyCFunction)(void (*)(void))Segment_store32, METH_FASTCALL, Segment_store32_doc},
    {"release", (PyCFunction)Segment_release, METH_O, Segment_release_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Segment_members[] = {
    {"fd", Py_T_INT, offsetof(SegmentObject, fd), Py_READONLY, "the segment's fd in this process"},
    {"size", Py_T_PYSSIZET, offsetof(SegmentObject, size), Py_READONLY, "size in bytes"},
    {"__weaklistoffset__", Py_T_PYSSIZET, offsetof(SegmentObject, weakreflist), Py_READONLY},
    {NULL},
};

static PyGetSetDef Segment_getset[] = {
    {"ino", (getter)Segment_get_ino, NULL, "inode of the memfd (identifies it)", NULL},
    {"closed", (getter)Segment_get_closed, NULL, "True once close() ran", NULL},
    {NULL},
};

static PyType_Slot Segment_slots[] = {
    {Py_tp_new, Segment_new},
    {Py_tp_dealloc, Segment_dealloc},
    {Py_tp_repr, Segment_repr},
    {Py_tp_methods, Segment_methods},
    {Py_tp_members, Segment_members},
    {Py_tp_getset, Segment_getset},
    {Py_bf_getbuffer, Segment_getbuffer},
    {Py_bf_releasebuffer, Segment_releasebuffer},
    {Py_tp_doc, (void *)"Segment(size)\n--\n\nA shared memory segment (memfd + shared mapping)."},
    {0, NULL},
};

static PyType_Spec Segment_spec = {
    .name = "pyparallel._core.Segment",
    .basicsize = sizeof(SegmentObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Segment_slots,
};

/* ------------------------------------------------------------------------------------------
 * SharedView: items of one type at an offset of a segment */

typedef struct {
    PyObject_HEAD
    Py_buffer seg_view; /* holds an export of the segment for as long as this view lives */
    char *ptr;
    Py_ssize_t shape[1];
    Py_ssize_t strides[1];
    Py_ssize_t itemsize;
    int scalar; /* a Value (0-d buffer, no index argument) rather than an Array */
    char code;  /* struct/array typecode of an item */
    char format[2];
    int fast_lock;        /* lock is a pyparallel SemLock: taken without a Python call */
    PyObject *obj;        /* the ctypes object whose .value the `value` property reads */
    PyObject *lock;       /* the lock of a synchronized wrapper, or NULL */
    PyObject *value_name; /* interned "value" */
} SharedViewObject;

/* Item size for an array-module typecode on this platform, 0 when unknown. */
static Py_ssize_t
pp_code_size(char code)
{
    switch (code) {
    case 'b':
    case 'B':
    case 'c':
    case '?':
        return 1;
    case 'h':
    case 'H':
        return 2;
    case 'i':
    case 'I':
    case 'f':
        return 4;
    case 'l':
    case 'L':
        return (Py_ssize_t)sizeof(long);
    case 'q':
    case 'Q':
    case 'd':
        return 8;
    default:
        return 0;
    }
}

static int
pp_code_signed(char code)
{
    return code == 'b' || code == 'h' || code == 'i' || code == 'l' || code == 'q';
}

static int
pp_code_integer(char code)
{
    return strchr("bBhHiIlLqQ", code) != NULL;
}

/* SharedView(segment, offset, code, length, scalar) */
static PyObject *
SharedView_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *py_seg;
    Py_ssize_t offset, length;
    int code, scalar;
    static char *kwlist[] = {"segment", "offset", "code", "length", "scalar", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnCnp:SharedView", kwlist, &py_seg, &offset,
                                     &code, &length, &scalar)) {
        return NULL;
    }
    Py_ssize_t itemsize = pp_code_size((char)code);
    if (itemsize == 0) {
        PyErr_Format(PyExc_ValueError, "unsupported typecode %c", code);
        return NULL;
    }
    if (offset < 0 || length < 0 || (scalar && length != 1) || offset % itemsize != 0) {
        PyErr_SetString(PyExc_ValueError, "invalid offset or length");
        return NULL;
    }
    SharedViewObject *self = (SharedViewObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(py_seg, &self->seg_view, PyBUF_WRITABLE) < 0) {
        self->seg_view.obj = NULL;
        Py_DECREF(self);
        return NULL;
    }
    if (length > (self->seg_view.len - offset) / itemsize || offset > self->seg_view.len) {
        Py_DECREF(self); /* releases the buffer */
        PyErr_SetString(PyExc_ValueError, "view does not fit in the segment");
        return NULL;
    }
    self->ptr = (char *)self->seg_view.buf + offset;
    self->shape[0] = length;
    self->strides[0] = itemsize;
    self->itemsize = itemsize;
    self->scalar = scalar;
    self->code = (char)code;
    self->format[0] = (char)code;
    self->format[1] = '\0';
    return (PyObject *)self;
}

static int
SharedView_traverse(SharedViewObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->seg_view.obj);
    Py_VISIT(self->obj);
    Py_VISIT(self->lock);
    return 0;
}

static int
SharedView_clear(SharedViewObject *self)
{
    Py_CLEAR(self->obj);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->value_name);
    if (self->seg_view.obj != NULL) {
        PyBuffer_Release(&self->seg_view);
    }
    return 0;
}

static void
SharedView_dealloc(SharedViewObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)SharedView_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
SharedView_getbuffer(SharedViewObject *self, Py_buffer *view, int flags)
{
    if (self->seg_view.obj == NULL) {
        PyErr_SetString(PyExc_ValueError, "view is released");
        return -1;
    }
    view->buf = self->ptr;
    view->obj = Py_NewRef(self);
    view->len = self->shape[0] * self->itemsize;
    view->readonly = 0;
    view->itemsize = self->itemsize;
    view->format = (flags & PyBUF_FORMAT) ? self->format : NULL;
    view->ndim = self->scalar ? 0 : 1;
    view->shape = (flags & PyBUF_ND) && !self->scalar ? self->shape : NULL;
    view->strides = (flags & PyBUF_STRIDES) && !self->scalar ? self->strides : NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    return 0;
}

/* ---- atomics ---- */

typedef enum {
    PP_AT_LOAD,
    PP_AT_STORE,
    PP_AT_EXCHANGE,
    PP_AT_FETCH_ADD,
    PP_AT_ADD,
    PP_AT_FETCH_SUB,
    PP_AT_SUB,
    PP_AT_CAS,
} pp_atomic_op;

/* One atomic operation on an integer of `size` bytes at p, on the bit pattern (so signed and
 * unsigned share it). Returns the result bits; *ok is the CAS result. Add and subtract go
 * through pp_atomic_checked instead: they must not wrap. */
#define PP_ATOMIC_BODY(T)                                                                          \
    do {                                                                                           \
        _Atomic T *a = (_Atomic T *)p;                                                             \
        T x = (T)v, e = (T)expected;                                                               \
        switch (op) {                                                                              \
        case PP_AT_LOAD:                                                                           \
            return (uint64_t)atomic_load(a);                                                       \
        case PP_AT_STORE:                                                                          \
            atomic_store(a, x);                                                                    \
            return 0;                                                                              \
        case PP_AT_EXCHANGE:                                                                       \
            return (uint64_t)atomic_exchange(a, x);                                                \
        case PP_AT_CAS:                                                                            \
            *ok = atomic_compare_exchange_strong(a, &e, x);                                        \
            return (uint64_t)e;                                                                    \
        default: /* add and subtract: pp_atomic_checked */                                         \
            break;                                                                                 \
        }                                                                                          \
        return 0;                                                                                  \
    } while (0)

static uint64_t
pp_atomic_apply(void *p, Py_ssize_t size, pp_atomic_op op, uint64_t v, uint64_t expected, int *ok)
{
    switch (size) {
    case 1:
        PP_ATOMIC_BODY(uint8_t);
    case 2:
        PP_ATOMIC_BODY(uint16_t);
    case 4:
        PP_ATOMIC_BODY(uint32_t);
    default:
        PP_ATOMIC_BODY(uint64_t);
    }
}

/* Atomically adds `v` to (`sub`: subtracts it from) the item of type T at p unless the result
 * leaves T's range: a compare-exchange loop. Returns 0 with *old the previous bits, or -1
 * (the item unchanged) when the result would overflow. */
#define PP_CHECKED_BODY(T)                                                                         \
    do {                                                                                           \
        _Atomic T *a = (_Atomic T *)p;                                                             \
        T x = (T)v, cur = atomic_load(a), next;                                                    \
        do {                                                                                       \
            if (sub ? __builtin_sub_overflow(cur, x, &next)                                        \
                    : __builtin_add_overflow(cur, x, &next)) {                                     \
                return -1;                                                                         \
            }                                                                                      \
        } while (!atomic_compare_exchange_weak(a, &cur, next));                                    \
        *old = (uint64_t)cur;                                                                      \
        return 0;                                                                                  \
    } while (0)

static int
pp_atomic_checked(void *p, Py_ssize_t size, int is_signed, int sub, uint64_t v, uint64_t *old)
{
    switch (size * (is_signed ? -1 : 1)) {
    case 1:
        PP_CHECKED_BODY(uint8_t);
    case -1:
        PP_CHECKED_BODY(int8_t);
    case 2:
        PP_CHECKED_BODY(uint16_t);
    case -2:
        PP_CHECKED_BODY(int16_t);
    case 4:
        PP_CHECKED_BODY(uint32_t);
    case -4:
        PP_CHECKED_BODY(int32_t);
    case -8:
        PP_CHECKED_BODY(int64_t);
    default:
        PP_CHECKED_BODY(uint64_t);
    }
}

/* Python int -> bit pattern of an item; range-checked like the item type. -1 on error. */
static int
pp_int_to_bits(SharedViewObject *self, PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "an integer is required (got type %.100s)",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    int bits = (int)(self->itemsize * 8);
    if (pp_code_signed(self->code)) {
        long long x = PyLong_AsLongLong(o);
        if (x == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (bits < 64 && (x < -(1LL << (bits - 1)) || x > (1LL << (bits - 1)) - 1)) {
            goto overflow;
        }
        *out = (uint64_t)x;
    }
    else {
        unsigned long long x = PyLong_AsUnsignedLongLong(o);
        if (x == (unsigned long long)-1 && PyErr_Occurred()) {
            return -1;
        }
        if (bits < 64 && x > (1ULL << bits) - 1) {
            goto overflow;
        }
        *out = (uint64_t)x;
    }
    return 0;
overflow:
    PyErr_Format(PyExc_OverflowError, "value does not fit in typecode '%c'", self->code);
    return -1;
}

static PyObject *
pp_bits_to_int(SharedViewObject *self, uint64_t b)
{
    switch (self->itemsize) {
    case 1:
        return pp_code_signed(self->code) ? PyLong_FromLong((int8_t)b)
                                          : PyLong_FromLong((uint8_t)b);
    case 2:
        return pp_code_signed(self->code) ? PyLong_FromLong((int16_t)b)
                                          : PyLong_FromLong((uint16_t)b);
    case 4:
        return pp_code_signed(self->code) ? PyLong_FromLong((int32_t)b)
                                          : PyLong_FromUnsignedLong((uint32_t)b);
    default:
        return pp_code_signed(self->code) ? PyLong_FromLongLong((int64_t)b)
                                          : PyLong_FromUnsignedLongLong(b);
    }
}

/* Shared entry of every atomic method: `nvals` value arguments after an index (arrays) or
 * none (values). */
static PyObject *
pp_atomic_call(SharedViewObject *self, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t nvals,
               pp_atomic_op op, const char *name)
{
    Py_ssize_t want = nvals + (self->scalar ? 0 : 1);
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd argument%s (%zd given)", name, want,
                     want == 1 ? "" : "s", nargs);
        return NULL;
    }
    Py_ssize_t i = 0;
    if (!self->scalar) {
        i = PyNumber_AsSsize_t(args[0], PyExc_IndexError);
        if (i == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (i < 0) {
            i += self->shape[0];
        }
        if (i < 0 || i >= self->shape[0]) {
            PyErr_SetString(PyExc_IndexError, "invalid index");
            return NULL;
        }
        args++;
    }
    if (self->seg_view.obj == NULL) {
        PyErr_SetString(PyExc_ValueError, "view is released");
        return NULL;
    }
    char *p = self->ptr + i * self->itemsize;
    if (!pp_code_integer(self->code)) {
        /* Floats: whole-item load/store/exchange only. */
        if (op != PP_AT_LOAD && op != PP_AT_STORE && op != PP_AT_EXCHANGE) {
            PyErr_Format(PyExc_TypeError, "%s() needs an integer typecode, not '%c'", name,
                         self->code);
            return NULL;
        }
        if (self->code != 'd' && self->code != 'f') {
            PyErr_Format(PyExc_TypeError, "no atomic operations for typecode '%c'", self->code);
            return NULL;
        }
        uint64_t bits = 0;
        if (op != PP_AT_LOAD) {
            double d = PyFloat_AsDouble(args[0]);
            if (d == -1.0 && PyErr_Occurred()) {
                return NULL;
            }
            if (self->code == 'd') {
                memcpy(&bits, &d, 8);
            }
            else {
                float f = (float)d;
                uint32_t b32;
                memcpy(&b32, &f, 4);
                bits = b32;
            }
        }
        uint64_t r = pp_atomic_apply(p, self->itemsize, op, bits, 0, NULL);
        if (op == PP_AT_STORE) {
            Py_RETURN_NONE;
        }
        if (self->code == 'd') {
            double d;
            memcpy(&d, &r, 8);
            return PyFloat_FromDouble(d);
        }
        uint32_t b32 = (uint32_t)r;
        float f;
        memcpy(&f, &b32, 4);
        return PyFloat_FromDouble(f);
    }
    uint64_t v = 0, expected = 0;
    if (op == PP_AT_CAS) {
        if (pp_int_to_bits(self, args[0], &expected) < 0 || pp_int_to_bits(self, args[1], &v) < 0) {
            return NULL;
        }
    }
    else if (nvals == 1 && pp_int_to_bits(self, args[0], &v) < 0) {
        return NULL;
    }
    if (op == PP_AT_FETCH_ADD || op == PP_AT_ADD || op == PP_AT_FETCH_SUB || op == PP_AT_SUB) {
        int sub = op == PP_AT_FETCH_SUB || op == PP_AT_SUB;
        uint64_t old;
        if (pp_atomic_checked(p, self->itemsize, pp_code_signed(self->code), sub, v, &old) < 0) {
            PyErr_Format(PyExc_OverflowError,
                         "%s() result does not fit the item, a%s %d-bit integer (it is left "
                         "unchanged)",
                         name, pp_code_signed(self->code) ? " signed" : "n unsigned",
                         (int)(self->itemsize * 8));
            return NULL;
        }
        if (op == PP_AT_ADD) {
            old += v; /* the new value, on the bit pattern: it fits, as checked */
        }
        else if (op == PP_AT_SUB) {
            old -= v;
        }
        return pp_bits_to_int(self, old);
    }
    int ok = 0;
    uint64_t r = pp_atomic_apply(p, self->itemsize, op, v, expected, &ok);
    if (op == PP_AT_STORE) {
        Py_RETURN_NONE;
    }
    if (op == PP_AT_CAS) {
        return PyBool_FromLong(ok);
    }
    return pp_bits_to_int(self, r);
}

#define PP_ATOMIC_METHOD(pyname, nvals, op, sig, text)                                             \
    PyDoc_STRVAR(SharedView_##pyname##_doc, #pyname "($self, " sig "/)\n--\n\n" text);             \
    static PyObject *SharedView_##pyname(SharedViewObject *self, PyObject *const *args,            \
                                         Py_ssize_t nargs)                                         \
    {                                                                                              \
        return pp_atomic_call(self, args, nargs, nvals, op, #pyname);                              \
    }

PP_ATOMIC_METHOD(load, 0, PP_AT_LOAD, "[index], ", "Atomically reads the item.")
PP_ATOMIC_METHOD(store, 1, PP_AT_STORE, "[index], value, ", "Atomically writes the item.")
PP_ATOMIC_METHOD(exchange, 1, PP_AT_EXCHANGE, "[index], value, ",
                 "Atomically writes the item; returns the previous value.")
PP_ATOMIC_METHOD(fetch_add, 1, PP_AT_FETCH_ADD, "[index], delta, ",
                 "Atomically adds delta; returns the previous value. OverflowError, the item "
                 "unchanged, when the sum does not fit the typecode.")
PP_ATOMIC_METHOD(add, 1, PP_AT_ADD, "[index], delta, ",
                 "Atomically adds delta; returns the new value. OverflowError, the item "
                 "unchanged, when the sum does not fit the typecode.")
PP_ATOMIC_METHOD(fetch_sub, 1, PP_AT_FETCH_SUB, "[index], delta, ",
                 "Atomically subtracts delta; returns the previous value. OverflowError, the "
                 "item unchanged, when the difference does not fit the typecode.")
PP_ATOMIC_METHOD(sub, 1, PP_AT_SUB, "[index], delta, ",
                 "Atomically subtracts delta; returns the new value. OverflowError, the item "
                 "unchanged, when the difference does not fit the typecode.")
PP_ATOMIC_METHOD(compare_exchange, 2, PP_AT_CAS, "[index], expected, desired, ",
                 "Atomically sets the item to desired if it equals expected; returns True when "
                 "it did.")

static PyMethodDef SharedView_methods[] = {
    {"load", (PyCFunction)(void (*)(void))SharedView_load, METH_FASTCALL, SharedView_load_doc},
    {"store", (PyCFunction)(void (*)(void))SharedView_store, METH_FASTCALL, SharedView_store_doc},
    {"exchange", (PyCFunction)(void (*)(void))SharedView_exchange, METH_FASTCALL,
     SharedView_exchange_doc},
    {"fetch_add", (PyCFunction)(void (*)(void))SharedView_fetch_add, METH_FASTCALL,
     SharedView_fetch_add_doc},
    {"add", (PyCFunction)(void (*)(void))SharedView_add, METH_FASTCALL, SharedView_add_doc},
    {"fetch_sub", (PyCFunction)(void (*)(void))SharedView_fetch_sub, METH_FASTCALL,
     SharedView_fetch_sub_doc},
    {"sub", (PyCFunction)(void (*)(void))SharedView_sub, METH_FASTCALL, SharedView_sub_doc},
    {"compare_exchange", (PyCFunction)(void (*)(void))SharedView_compare_exchange, METH_FASTCALL,
     SharedView_compare_exchange_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *
SharedView_get_segment(SharedViewObject *self, void *Py_UNUSED(closure))
{
    if (self->seg_view.obj == NULL) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(self->seg_view.obj);
}

static PyObject *
SharedView_get_offset(SharedViewObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->ptr - (char *)self->seg_view.buf);
}

static PyObject *
SharedView_get_typecode(SharedViewObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromStringAndSize(&self->code, 1);
}

static PyObject *
SharedView_get_obj(SharedViewObject *self, void *Py_UNUSED(closure))
{
    if (self->obj == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_obj");
        return NULL;
    }
    return Py_NewRef(self->obj);
}

static int
SharedView_set_obj(SharedViewObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (self->value_name == NULL) {
        self->value_name = PyUnicode_InternFromString("value");
        if (self->value_name == NULL) {
            return -1;
        }
    }
    Py_XSETREF(self->obj, Py_XNewRef(value));
    return 0;
}

static PyObject *
SharedView_get_lock(SharedViewObject *self, void *Py_UNUSED(closure))
{
    if (self->lock == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_lock");
        return NULL;
    }
    return Py_NewRef(self->lock);
}

static int
SharedView_set_lock(SharedViewObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    self->fast_lock = value != NULL && pp_is_semlock(value);
    Py_XSETREF(self->lock, Py_XNewRef(value));
    return 0;
}

/* .value of a synchronized wrapper: the ctypes object's value, read under the lock (as
 * multiprocessing's Synchronized does, without two Python-level calls per access). */
static PyObject *
SharedView_get_value(SharedViewObject *self, void *Py_UNUSED(closure))
{
    if (self->obj == NULL || self->lock == NULL) {
        PyErr_SetString(PyExc_AttributeError, "value");
        return NULL;
    }
    PyObject *lock = Py_NewRef(self->lock);
    if (pp_lock_enter(lock, self->fast_lock) < 0) {
        Py_DECREF(lock);
        return NULL;
    }
    PyObject *py_v = PyObject_GetAttr(self->obj, self->value_name);
    if (pp_lock_exit(lock, self->fast_lock) < 0) {
        Py_CLEAR(py_v);
    }
    Py_DECREF(lock);
    return py_v;
}

static int
SharedView_set_value(SharedViewObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (self->obj == NULL || self->lock == NULL || value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot set or delete value");
        return -1;
    }
    PyObject *lock = Py_NewRef(self->lock);
    if (pp_lock_enter(lock, self->fast_lock) < 0) {
        Py_DECREF(lock);
        return -1;
    }
    int r = PyObject_SetAttr(self->obj, self->value_name, value);
    if (pp_lock_exit(lock, self->fast_lock) < 0) {
        r = -1;
    }
    Py_DECREF(lock);
    return r;
}

static PyGetSetDef SharedView_getset[] = {
    {"_obj", (getter)SharedView_get_obj, (setter)SharedView_set_obj, "the ctypes object", NULL},
    {"_lock", (getter)SharedView_get_lock, (setter)SharedView_set_lock, "the lock", NULL},
    {"value", (getter)SharedView_get_value, (setter)SharedView_set_value,
     "the value, read and written under the lock", NULL},
    {"_segment", (getter)SharedView_get_segment, NULL, "the Segment this view is on", NULL},
    {"_offset", (getter)SharedView_get_offset, NULL, "byte offset in the segment", NULL},
    {"_typecode", (getter)SharedView_get_typecode, NULL, "typecode of an item", NULL},
    {NULL},
};

static PyType_Slot SharedView_slots[] = {
    {Py_tp_new, SharedView_new},
    {Py_tp_dealloc, SharedView_dealloc},
    {Py_tp_traverse, SharedView_traverse},
    {Py_tp_clear, SharedView_clear},
    {Py_tp_methods, SharedView_methods},
    {Py_tp_getset, SharedView_getset},
    {Py_bf_getbuffer, SharedView_getbuffer},
    {Py_tp_doc, (void *)"SharedView(segment, offset, code, length, scalar)\n--\n\n"
                        "Typed items in a segment: buffer protocol and atomic operations."},
    {0, NULL},
};

static PyType_Spec SharedView_spec = {
    .name = "pyparallel._core.SharedView",
    .basicsize = sizeof(SharedViewObject),
    .flags =
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = SharedView_slots,
};

int
pp_shm_exec(PyObject *module, pp_state *st)
{
    st->SegmentType = PyType_FromModuleAndSpec(module, &Segment_spec, NULL);
    if (st->SegmentType == NULL || PyModule_AddObjectRef(module, "Segment", st->SegmentType) < 0) {
        return -1;
    }
    st->SharedViewType = PyType_FromModuleAndSpec(module, &SharedView_spec, NULL);
    if (st->SharedViewType == NULL ||
        PyModule_AddObjectRef(module, "SharedView", st->SharedViewType) < 0) {
        return -1;
    }
    return 0;
}
