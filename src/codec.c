/* codec.c: lists of plain numbers and of plain records packed, for the pool's messages.
 *
 * A map over tiny tasks moves long lists of ints or floats both ways (a chunk of arguments,
 * a chunk of results). pickle spends an opcode and an object per item; packing the same list
 * into an int64 or float64 array takes one pass and unpacking it one allocation per item,
 * several times less work on both sides. Only exact types are packed (no bool, no int or
 * float subclass, ints within int64), so unpacking gives back equal objects of the same
 * types; anything else is left to pickle. */
#include "pp.h"

#include <string.h>

/* The items seq[start:stop] of the list or tuple args[0], with args[1] and args[2] the
 * optional start and stop (stop None: len(seq); 0 <= start <= stop <= len(seq), else
 * ValueError): 1 with *items and *n set, 0 when seq is not an exact list or tuple or the
 * range is empty, -1 with an exception set. The items are borrowed: the caller runs no
 * Python code while it reads them. */
static int
pack_range(const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject ***items,
           Py_ssize_t *n)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "%s(seq[, start, stop])", name);
        return -1;
    }
    PyObject *seq = args[0];
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) {
        return 0;
    }
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq), start = 0, stop = len;
    if (nargs >= 2) {
        start = PyLong_AsSsize_t(args[1]);
        if (start == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (nargs == 3 && args[2] != Py_None) {
            stop = PyLong_AsSsize_t(args[2]);
            if (stop == -1 && PyErr_Occurred()) {
                return -1;
            }
        }
        if (start < 0 || stop < start || stop > len) {
            PyErr_Format(PyExc_ValueError,
                         "%s: start and stop must have 0 <= start <= stop <= "
                         "len(seq)",
                         name);
            return -1;
        }
    }
    *items = PySequence_Fast_ITEMS(seq) + start;
    *n = stop - start;
    return *n > 0;
}

/* pack_numbers(seq[, start, stop], /) -> (typecode, bytes) | None */
static PyObject *
pp_pack_numbers(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject **items;
    Py_ssize_t n;
    int r = pack_range("pack_numbers", args, nargs, &items, &n);
    if (r <= 0) {
        return r < 0 ? NULL : Py_NewRef(Py_None);
    }
    char code;
    if (PyLong_CheckExact(items[0])) {
        code = 'q';
    }
    else if (PyFloat_CheckExact(items[0])) {
        code = 'd';
    }
    else {
        Py_RETURN_NONE;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL) {
        return NULL;
    }
    char *dst = PyBytes_AS_STRING(out);
    /* A list may be changed by another thread between items only while the GIL is released;
     * nothing here releases it, so n and items stay valid. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = items[i];
        if (code == 'q') {
            if (!PyLong_CheckExact(o)) {
                goto not_packable;
            }
            int overflow;
            long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
            if (overflow) {
                goto not_packable;
            }
            int64_t w = (int64_t)v;
            memcpy(dst + 8 * i, &w, 8);
        }
        else {
            if (!PyFloat_CheckExact(o)) {
                goto not_packable;
            }
            double d = PyFloat_AS_DOUBLE(o);
            memcpy(dst + 8 * i, &d, 8);
        }
    }
    return Py_BuildValue("(CN)", code, out);
not_packable:
    Py_DECREF(out);
    Py_RETURN_NONE;
}

/* unpack_numbers(typecode, buffer, /) -> list */
static PyObject *
pp_unpack_numbers(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "unpack_numbers(typecode, buffer)");
        return NULL;
    }
    if (!PyUnicode_Check(args[0]) || PyUnicode_GET_LENGTH(args[0]) != 1) {
        PyErr_SetString(PyExc_TypeError, "unpack_numbers: typecode must be 'q' or 'd'");
        return NULL;
    }
    Py_UCS4 code = PyUnicode_READ_CHAR(args[0], 0);
    if (code != 'q' && code != 'd') {
        PyErr_SetString(PyExc_ValueError, "unpack_numbers: typecode must be 'q' or 'd'");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len % 8 != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "unpack_numbers: buffer length is not a multiple of 8");
        return NULL;
    }
    Py_ssize_t n = view.len / 8;
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const char *src = view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o;
        if (code == 'q') {
            int64_t w;
            memcpy(&w, src + 8 * i, 8);
            o = PyLong_FromLongLong((long long)w);
        }
        else {
            double d;
            memcpy(&d, src + 8 * i, 8);
            o = PyFloat_FromDouble(d);
        }
        if (o == NULL) {
            Py_DECREF(list);
            PyBuffer_Release(&view);
            return NULL;
        }
        PyList_SET_ITEM(list, i, o);
    }
    PyBuffer_Release(&view);
    return list;
}

/* ---- records: lists of plain tuples (or of plain strings) ----
 *
 * The everyday map goes over records: ("type1", i), (name, price, qty), and returns them.
 * pickle spends several opcodes, a memo lookup and a dispatch per field; a list whose items
 * are all exact tuples of one length, each field of a fixed kind through the list (the
 * first item's), packs into one buffer in one pass and unpacks in one allocation per object.
 * The kinds: exact int within int64 ('q'), exact float ('d'), exact str ('s': its code
 * points as stored, so lone surrogates too; a field that is the very object of the previous
 * item's is written once and shared again on unpacking, as pickle's memo would), and None,
 * True or False ('k'). A list of only exact strs packs the same way (arity 0). Anything
 * else (a subclass, a nested container, a bigger int, a field changing kind) is left to
 * pickle: packing returns None.
 *
 * Layout: 'R', arity (0..PP_REC_MAX), one kind per field (one for arity 0), padding to 8,
 * the number of items (int64), then the items back to back: q and d as 8 bytes, k as one
 * byte (0 None, 1 False, 2 True), s as one byte (0: the previous item's; else the str's
 * kind, 1, 2 or 4) then, unless shared, a uint32 length in code points and the code
 * points. Native byte order: both ends are on this machine. */

#define PP_REC_MAX 32

typedef struct {
    PyObject *bytes;
    char *p;
    Py_ssize_t len, cap;
    Py_ssize_t rest; /* bytes still owed to the fixed parts of the items not yet written */
} rec_buf;

static int
rec_reserve(rec_buf *b, Py_ssize_t more)
{
    if (b->len + more <= b->cap) {
        return 0;
    }
    Py_ssize_t cap = b->cap;
    while (cap < b->len + more) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    if (_PyBytes_Resize(&b->bytes, cap) < 0) {
        return -1;
    }
    b->cap = cap;
    b->p = PyBytes_AS_STRING(b->bytes);
    return 0;
}

/* The kind of field `o`, or 0 when it has none of the packable kinds. */
static char
rec_kind(PyObject *o)
{
    if (PyLong_CheckExact(o)) {
        return 'q';
    }
    if (PyFloat_CheckExact(o)) {
        return 'd';
    }
    if (PyUnicode_CheckExact(o)) {
        return 's';
    }
    if (o == Py_None || o == Py_True || o == Py_False) {
        return 'k';
    }
    return 0;
}

/* Writes field `o` of kind `kind`; 1 written, 0 not packable, -1 error (exception set). */
static int
rec_put(rec_buf *b, char kind, PyObject *o, PyObject *prev)
{
    switch (kind) {
    case 'q': {
        if (!PyLong_CheckExact(o)) {
            return 0;
        }
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) {
            return 0;
        }
        int64_t w = (int64_t)v;
        memcpy(b->p + b->len, &w, 8);
        b->len += 8;
        return 1;
    }
    case 'd': {
        if (!PyFloat_CheckExact(o)) {
            return 0;
        }
        double d = PyFloat_AS_DOUBLE(o);
        memcpy(b->p + b->len, &d, 8);
        b->len += 8;
        return 1;
    }
    case 'k':
        if (o == Py_None) {
            b->p[b->len++] = 0;
        }
        else if (o == Py_False) {
            b->p[b->len++] = 1;
        }
        else if (o == Py_True) {
            b->p[b->len++] = 2;
        }
        else {
            return 0;
        }
        return 1;
    default: { /* 's' */
        if (!PyUnicode_CheckExact(o)) {
            return 0;
        }
        if (o == prev) {
            b->p[b->len++] = 0;
            return 1;
        }
        Py_ssize_t n = PyUnicode_GET_LENGTH(o);
        int ukind = PyUnicode_KIND(o);
        if (n > (Py_ssize_t)UINT32_MAX) {
            return 0;
        }
        Py_ssize_t size = n * ukind;
        /* its code points, and the fixed parts of this item and the rest: pp_pack_records */
        if (rec_reserve(b, size + b->rest) < 0) {
            return -1;
        }
        uint32_t n32 = (uint32_t)n;
        b->p[b->len] = (char)ukind;
        memcpy(b->p + b->len + 1, &n32, 4);
        memcpy(b->p + b->len + 5, PyUnicode_DATA(o), (size_t)size);
        b->len += 5 + size;
        return 1;
    }
    }
}

/* The packer's state between items: a buffer being filled and the first item's layout. */
typedef struct {
    rec_buf b;
    char kinds[PP_REC_MAX];
    Py_ssize_t arity, nk, fixed, head, n;
    PyObject *prev[PP_REC_MAX]; /* borrowed: the caller keeps the previous item alive */
} rec_packer;

/* Starts packing with `first` as the layout; 1 started, 0 not packable, -1 error. `hint`:
 * items expected (room reserved for their fixed parts). */
static int
rec_start(rec_packer *pk, PyObject *first, Py_ssize_t hint)
{
    memset(pk, 0, sizeof(*pk));
    pk->nk = 1;
    if (PyTuple_CheckExact(first)) {
        pk->arity = PyTuple_GET_SIZE(first);
        if (pk->arity == 0 || pk->arity > PP_REC_MAX) {
            return 0;
        }
        pk->nk = pk->arity;
        for (Py_ssize_t j = 0; j < pk->arity; j++) {
            pk->kinds[j] = rec_kind(PyTuple_GET_ITEM(first, j));
            if (pk->kinds[j] == 0) {
                return 0;
            }
        }
    }
    else {
        pk->kinds[0] = rec_kind(first);
        if (pk->kinds[0] != 's') { /* plain ints and floats: pack_numbers */
            return 0;
        }
    }
    for (Py_ssize_t j = 0; j < pk->nk; j++) {
        char k = pk->kinds[j];
        pk->fixed += k == 'q' || k == 'd' ? 8 : k == 'k' ? 1 : 5;
    }
    pk->head = (2 + pk->nk + 7) / 8 * 8 + 8;
    if (hint < 1) {
        hint = 1;
    }
    if (hint > (PY_SSIZE_T_MAX - pk->head) / pk->fixed - 1) {
        PyErr_NoMemory();
        return -1;
    }
    pk->b.cap = pk->head + hint * pk->fixed;
    pk->b.bytes = PyBytes_FromStringAndSize(NULL, pk->b.cap);
    if (pk->b.bytes == NULL) {
        return -1;
    }
    pk->b.p = PyBytes_AS_STRING(pk->b.bytes);
    memset(pk->b.p, 0, (size_t)pk->head);
    pk->b.p[0] = 'R';
    pk->b.p[1] = (char)pk->arity;
    memcpy(pk->b.p + 2, pk->kinds, (size_t)pk->nk);
    pk->b.len = pk->head;
    return 1;
}

/* Appends one item; 1 done, 0 not of the layout (nothing written), -1 error. Room: every
 * item's fixed part (5 bytes per str) is reserved before it is written, and a str reserves
 * its code points beyond that, so nothing is written past cap. Runs no Python code. */
static int
rec_add(rec_packer *pk, PyObject *it)
{
    rec_buf *b = &pk->b;
    if (b->len + pk->fixed > b->cap && rec_reserve(b, pk->fixed) < 0) {
        return -1;
    }
    b->rest = pk->fixed;
    Py_ssize_t mark = b->len;
    int r = 1;
    if (pk->arity == 0) {
        r = rec_put(b, pk->kinds[0], it, pk->prev[0]);
        if (r > 0) {
            pk->prev[0] = it;
        }
    }
    else {
        if (!PyTuple_CheckExact(it) || PyTuple_GET_SIZE(it) != pk->arity) {
            return 0;
        }
        for (Py_ssize_t j = 0; j < pk->arity && r > 0; j++) {
            r = rec_put(b, pk->kinds[j], PyTuple_GET_ITEM(it, j), pk->prev[j]);
        }
        if (r > 0) {
            for (Py_ssize_t j = 0; j < pk->arity; j++) {
                pk->prev[j] = PyTuple_GET_ITEM(it, j);
            }
        }
    }
    if (r <= 0) {
        b->len = mark;
        return r;
    }
    pk->n++;
    return 1;
}

/* The packed bytes (the packer is spent). */
static PyObject *
rec_finish(rec_packer *pk)
{
    int64_t n64 = (int64_t)pk->n;
    memcpy(pk->b.p + pk->head - 8, &n64, 8);
    if (_PyBytes_Resize(&pk->b.bytes, pk->b.len) < 0) {
        return NULL;
    }
    PyObject *out = pk->b.bytes;
    pk->b.bytes = NULL;
    return out;
}

/* pack_records(seq[, start, stop], /) -> bytes | None */
static PyObject *
pp_pack_records(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject **items;
    Py_ssize_t n;
    int r = pack_range("pack_records", args, nargs, &items, &n);
    if (r <= 0) {
        return r < 0 ? NULL : Py_NewRef(Py_None);
    }
    rec_packer pk;
    r = rec_start(&pk, items[0], n);
    if (r <= 0) {
        return r < 0 ? NULL : Py_NewRef(Py_None);
    }
    /* Nothing here runs Python code or releases the GIL, so seq cannot change meanwhile
     * (and its items keep the previous fields alive). */
    for (Py_ssize_t i = 0; i < n; i++) {
        r = rec_add(&pk, items[i]);
        if (r <= 0) {
            Py_DECREF(pk.b.bytes);
            return r < 0 ? NULL : Py_NewRef(Py_None);
        }
    }
    return rec_finish(&pk);
}

/* pack_iter(iterable, /) -> bytes | list: the items, packed as they come when they are
 * plain records (see pack_records) and else, from the first one that is not, a list of
 * them all (the ones packed so far unpacked again: equal new tuples). */
static PyObject *rec_unpack_all(PyObject *bytes);

static PyObject *
pp_pack_iter(PyObject *Py_UNUSED(module), PyObject *iterable)
{
    PyObject *it = PyObject_GetIter(iterable);
    if (it == NULL) {
        return NULL;
    }
    PyObject *list = NULL, *prev = NULL, *y = NULL;
    rec_packer pk;
    pk.b.bytes = NULL;
    int packing = 0;
    y = PyIter_Next(it);
    if (y != NULL) {
        packing = rec_start(&pk, y, 1024);
        if (packing < 0) {
            goto error;
        }
    }
    while (y != NULL) {
        if (packing) {
            int r = rec_add(&pk, y);
            if (r < 0) {
                goto error;
            }
            if (r > 0) {
                Py_XSETREF(prev, y); /* keeps the fields the next item may share alive */
                y = NULL;
            }
            else { /* not a record like the others: a list from here on */
                PyObject *bytes = rec_finish(&pk);
                if (bytes == NULL) {
                    goto error;
                }
                list = rec_unpack_all(bytes);
                Py_DECREF(bytes);
                if (list == NULL) {
                    goto error;
                }
                packing = 0;
                Py_CLEAR(prev);
            }
        }
        if (!packing) {
            if (list == NULL && (list = PyList_New(0)) == NULL) {
                goto error;
            }
            int r = PyList_Append(list, y);
            Py_CLEAR(y);
            if (r < 0) {
                goto error;
            }
        }
        y = PyIter_Next(it);
    }
    if (PyErr_Occurred()) {
        goto error;
    }
    Py_DECREF(it);
    Py_XDECREF(prev);
    if (packing) {
        return rec_finish(&pk);
    }
    return list != NULL ? list : PyList_New(0);
error:
    Py_DECREF(it);
    Py_XDECREF(y);
    Py_XDECREF(prev);
    Py_XDECREF(list);
    if (packing) {
        Py_XDECREF(pk.b.bytes);
    }
    return NULL;
}

static PyObject *
rec_corrupt(void)
{
    PyErr_SetString(PyExc_ValueError, "unpack_records: malformed buffer");
    return NULL;
}

/* One field from src[*pos..end); a new reference, or NULL (exception set). */
static PyObject *
rec_get(const char *src, Py_ssize_t *pos, Py_ssize_t end, char kind, PyObject *prev)
{
    Py_ssize_t at = *pos;
    switch (kind) {
    case 'q': {
        if (end - at < 8) {
            return rec_corrupt();
        }
        int64_t w;
        memcpy(&w, src + at, 8);
        *pos = at + 8;
        return PyLong_FromLongLong((long long)w);
    }
    case 'd': {
        if (end - at < 8) {
            return rec_corrupt();
        }
        double d;
        memcpy(&d, src + at, 8);
        *pos = at + 8;
        return PyFloat_FromDouble(d);
    }
    case 'k': {
        if (end - at < 1 || (unsigned char)src[at] > 2) {
            return rec_corrupt();
        }
        *pos = at + 1;
        PyObject *o = src[at] == 0 ? Py_None : src[at] == 1 ? Py_False : Py_True;
        return Py_NewRef(o);
    }
    default: { /* 's' */
        if (end - at < 1) {
            return rec_corrupt();
        }
        int ukind = (unsigned char)src[at];
        if (ukind == 0) {
            if (prev == NULL) {
                return rec_corrupt();
            }
            *pos = at + 1;
            return Py_NewRef(prev);
        }
        if ((ukind != 1 && ukind != 2 && ukind != 4) || end - at < 5) {
            return rec_corrupt();
        }
        uint32_t n32;
        memcpy(&n32, src + at + 1, 4);
        Py_ssize_t size = (Py_ssize_t)n32 * ukind;
        if (end - at - 5 < size) {
            return rec_corrupt();
        }
        *pos = at + 5 + size;
        return PyUnicode_FromKindAndData(ukind, src + at + 5, (Py_ssize_t)n32);
    }
    }
}

/* Reads the header: 0, or -1 with ValueError set. */
static int
rec_header(const char *src, Py_ssize_t end, Py_ssize_t *arity, char *kinds, Py_ssize_t *n,
           Py_ssize_t *head)
{
    if (end < 2 || src[0] != 'R' || (unsigned char)src[1] > PP_REC_MAX) {
        rec_corrupt();
        return -1;
    }
    *arity = (unsigned char)src[1];
    Py_ssize_t nk = *arity ? *arity : 1;
    *head = (2 + nk + 7) / 8 * 8 + 8;
    if (end < *head) {
        rec_corrupt();
        return -1;
    }
    memcpy(kinds, src + 2, (size_t)nk);
    for (Py_ssize_t j = 0; j < nk; j++) {
        if (kinds[j] != 'q' && kinds[j] != 'd' && kinds[j] != 's' && kinds[j] != 'k') {
            rec_corrupt();
            return -1;
        }
    }
    int64_t n64;
    memcpy(&n64, src + *head - 8, 8);
    if (n64 < 0 || n64 > end - *head) { /* every item takes at least one byte */
        rec_corrupt();
        return -1;
    }
    *n = (Py_ssize_t)n64;
    return 0;
}

/* A new list of the `count` items from src[*pos..end); `prev`: the previous item's fields
 * (borrowed; updated to fields of the list's last item). NULL with an exception set. */
static PyObject *
rec_items(const char *src, Py_ssize_t end, Py_ssize_t arity, const char *kinds, Py_ssize_t *pos,
          PyObject **prev, Py_ssize_t count)
{
    PyObject *list = PyList_New(count);
    if (list == NULL) {
        return NULL;
    }
    /* No Python code sees the list while it is filled: untracked meanwhile, the cycle
     * collector's passes (one per 700 tuples made) do not walk it again and again. */
    PyObject_GC_UnTrack(list);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item;
        if (arity == 0) {
            item = rec_get(src, pos, end, kinds[0], prev[0]);
            if (item == NULL) {
                goto fail;
            }
            prev[0] = item;
        }
        else {
            item = PyTuple_New(arity);
            if (item == NULL) {
                goto fail;
            }
            for (Py_ssize_t j = 0; j < arity; j++) {
                PyObject *o = rec_get(src, pos, end, kinds[j], prev[j]);
                if (o == NULL) {
                    Py_DECREF(item);
                    goto fail;
                }
                PyTuple_SET_ITEM(item, j, o);
                prev[j] = o;
            }
            /* Its fields are ints, floats, strs and singletons, none of which the cycle
             * collector tracks: untrack it now, as the collector itself would at its first
             * pass over it (a big list of records would otherwise cost several passes). */
            PyObject_GC_UnTrack(item);
        }
        PyList_SET_ITEM(list, i, item);
    }
    PyObject_GC_Track(list);
    return list;
fail:
    Py_DECREF(list); /* its unset items are NULL, which list_dealloc skips */
    return NULL;
}

static PyObject *
rec_unpack_all(PyObject *bytes)
{
    const char *src = PyBytes_AS_STRING(bytes);
    Py_ssize_t end = PyBytes_GET_SIZE(bytes), arity, n, head;
    char kinds[PP_REC_MAX];
    if (rec_header(src, end, &arity, kinds, &n, &head) < 0) {
        return NULL;
    }
    PyObject *prev[PP_REC_MAX] = {NULL};
    Py_ssize_t pos = head;
    PyObject *list = rec_items(src, end, arity, kinds, &pos, prev, n);
    if (list != NULL && pos != end) {
        Py_DECREF(list);
        return rec_corrupt();
    }
    return list;
}

/* unpack_records(buffer, /) -> list
 * unpack_records(buffer, state, count, /) -> (list, state): the next `count` items at most;
 * state None to start, and None again once every item was read. */
static PyObject *
pp_unpack_records(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "unpack_records(buffer[, state, count])");
        return NULL;
    }
    Py_ssize_t count = -1;
    if (nargs == 3) {
        count = PyLong_AsSsize_t(args[2]);
        if (count == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (count < 1) {
            PyErr_SetString(PyExc_ValueError, "unpack_records: count must be at least 1");
            return NULL;
        }
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL, *list = NULL;
    const char *src = view.buf;
    Py_ssize_t end = view.len, arity, n, head;
    char kinds[PP_REC_MAX];
    if (rec_header(src, end, &arity, kinds, &n, &head) < 0) {
        goto done;
    }
    Py_ssize_t nk = arity ? arity : 1;
    PyObject *prev[PP_REC_MAX] = {NULL};
    Py_ssize_t pos = head, at = 0;
    if (nargs == 3 && args[1] != Py_None) { /* (pos, items read, previous fields) */
        PyObject *st = args[1];
        if (!PyTuple_CheckExact(st) || PyTuple_GET_SIZE(st) != 2 + nk) {
            PyErr_SetString(PyExc_ValueError, "unpack_records: bad state");
            goto done;
        }
        pos = PyLong_AsSsize_t(PyTuple_GET_ITEM(st, 0));
        at = PyLong_AsSsize_t(PyTuple_GET_ITEM(st, 1));
        if ((pos == -1 || at == -1) && PyErr_Occurred()) {
            goto done;
        }
        if (pos < head || pos > end || at < 0 || at > n) {
            PyErr_SetString(PyExc_ValueError, "unpack_records: bad state");
            goto done;
        }
        for (Py_ssize_t j = 0; j < nk; j++) {
            PyObject *o = PyTuple_GET_ITEM(st, 2 + j);
            prev[j] = o == Py_None ? NULL : o; /* borrowed: the state tuple holds them */
        }
    }
    Py_ssize_t take = count < 0 || count > n - at ? n - at : count;
    list = rec_items(src, end, arity, kinds, &pos, prev, take);
    if (list == NULL) {
        goto done;
    }
    at += take;
    if (at == n && pos != end) {
        rec_corrupt();
        goto done;
    }
    if (nargs == 1) {
        result = list;
        list = NULL;
        goto done;
    }
    PyObject *state = Py_None;
    Py_INCREF(state);
    if (at < n) {
        Py_DECREF(state);
        state = PyTuple_New(2 + nk);
        if (state == NULL) {
            goto done;
        }
        PyObject *a = PyLong_FromSsize_t(pos), *b = PyLong_FromSsize_t(at);
        if (a == NULL || b == NULL) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_DECREF(state);
            goto done;
        }
        PyTuple_SET_ITEM(state, 0, a);
        PyTuple_SET_ITEM(state, 1, b);
        for (Py_ssize_t j = 0; j < nk; j++) {
            PyTuple_SET_ITEM(state, 2 + j, Py_NewRef(prev[j] != NULL ? prev[j] : Py_None));
        }
    }
    result = PyTuple_Pack(2, list, state);
    Py_DECREF(state);
done:
    Py_XDECREF(list);
    PyBuffer_Release(&view);
    return result;
}

PyMethodDef pp_codec_methods[] = {
    {"pack_numbers", (PyCFunction)(void (*)(void))pp_pack_numbers, METH_FASTCALL,
     "pack_numbers($module, seq, start=0, stop=None, /)\n--\n\n"
     "(typecode, bytes) for a list or tuple (or its items start..stop-1) of only exact ints\n"
     "within int64 ('q') or only exact floats ('d'); None for anything else."},
    {"unpack_numbers", (PyCFunction)(void (*)(void))pp_unpack_numbers, METH_FASTCALL,
     "unpack_numbers($module, typecode, buffer, /)\n--\n\n"
     "The list that pack_numbers packed into buffer."},
    {"pack_records", (PyCFunction)(void (*)(void))pp_pack_records, METH_FASTCALL,
     "pack_records($module, seq, start=0, stop=None, /)\n--\n\n"
     "bytes for a list or tuple (or its items start..stop-1) of only exact tuples of one\n"
     "length whose fields keep one kind\n"
     "(exact int within int64, exact float, exact str, None/True/False), or of only exact\n"
     "strs; None for anything else."},
    {"pack_iter", pp_pack_iter, METH_O,
     "pack_iter($module, iterable, /)\n--\n\n"
     "The items, packed as pack_records packs them (bytes) when they all are plain records of\n"
     "one layout, else a list of them (those packed before the first other one unpacked\n"
     "again: equal, new tuples)."},
    {"unpack_records", (PyCFunction)(void (*)(void))pp_unpack_records, METH_FASTCALL,
     "unpack_records($module, buffer, state=None, count=None, /)\n--\n\n"
     "The list that pack_records packed into buffer (its tuples are new tuples). With state\n"
     "and count: (the next count items at most, the state to go on from), state None to\n"
     "start and None again after the last item."},
    {NULL, NULL, 0, NULL},
};
