/* errors.c: the one place where a pp_status from GIL-free code becomes a Python exception. */
#include "pp.h"

PyObject *
pp_raise(pp_status st, int err)
{
    switch (st) {
    case PP_OK:
        PyErr_SetString(PyExc_SystemError, "pp_raise called with PP_OK");
        break;
    case PP_ERR_NOMEM:
        PyErr_NoMemory();
        break;
    case PP_ERR_OS:
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    case PP_ERR_OVERFLOW:
        PyErr_SetString(PyExc_OverflowError, "result does not fit");
        break;
    case PP_ERR_TIMEOUT:
        PyErr_SetString(PyExc_TimeoutError, "timed out");
        break;
    case PP_ERR_INTERRUPT:
        /* A signal arrived while waiting: let its Python handler run (KeyboardInterrupt). */
        if (PyErr_CheckSignals() == 0) {
            PyErr_SetFromErrno(PyExc_InterruptedError);
        }
        break;
    case PP_ERR_CANCELLED: /* kernels raise KernelCancelled themselves; a generic fallback */
        PyErr_SetString(PyExc_RuntimeError, "cancelled");
        break;
    case PP_ERR_CLOSED:
        PyErr_SetString(PyExc_BrokenPipeError, "the other side has closed");
        break;
    }
    return NULL;
}
