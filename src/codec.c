/* codec.c: lists of plain numbers as packed arrays, for the pool's messages.
 *
 * A map over tiny tasks moves long lists of ints or floats both ways (a chunk of arguments,
 * a chunk of results). pickle spends an opcode and an object per item; packing the same list
 * into an int64 or float64 array takes one pass and unpacking it one allocation per item,
 * several times less work on both sides. Only exact types are packed (no bool, no int or
 * float subclass, ints within int64), so unpacking gives back equal objects of the same
 * types; anything else is left to pickle. */
#include "pp.h"

#include <string.h>

/* pack_numbers(seq, /) -> (typecode, bytes) | None */
static PyObject *
pp_pack_numbers(PyObject *Py_UNUSED(module), PyObject *seq)
{
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (n == 0) {
        Py_RETURN_NONE;
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

PyMethodDef pp_codec_methods[] = {
    {"pack_numbers", pp_pack_numbers, METH_O,
     "pack_numbers($module, seq, /)\n--\n\n"
     "(typecode, bytes) for a list or tuple of only exact ints within int64 ('q') or only\n"
     "exact floats ('d'); None for anything else."},
    {"unpack_numbers", (PyCFunction)(void (*)(void))pp_unpack_numbers, METH_FASTCALL,
     "unpack_numbers($module, typecode, buffer, /)\n--\n\n"
     "The list that pack_numbers packed into buffer."},
    {NULL, NULL, 0, NULL},
};
