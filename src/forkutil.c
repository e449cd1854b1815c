/* forkutil.c: fork() for the pool's workers, without the interpreter's warning.
 *
 * From Python 3.12, os.fork() warns (DeprecationWarning) whenever the process has more than
 * one OS thread. A pool forks replacement workers from its collector thread while the main
 * thread runs, exactly as multiprocessing.Pool forks them from its worker-handler thread; the
 * child only ever runs the forking thread, and the interpreter's own fork hooks
 * (PyOS_BeforeFork / PyOS_AfterFork_*: the import lock, os.register_at_fork callbacks) run as
 * they do for os.fork(). Only the warning, which is about threads the caller does not know,
 * is left out: the pool knows its own threads. */
#include "pp.h"

#include <errno.h>
#include <link.h>
#include <unistd.h>

PyDoc_STRVAR(pp_fork_doc, "fork($module, /)\n--\n\n"
                          "os.fork() without the multi-threaded-process DeprecationWarning: 0 in "
                          "the child, the child's pid in the parent. For pyparallel's workers.");

static PyObject *
pp_fork(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    PyOS_BeforeFork();
    pid_t pid = fork();
    int saved = errno;
    if (pid == 0) {
        PyOS_AfterFork_Child();
        return PyLong_FromLong(0);
    }
    PyOS_AfterFork_Parent();
    if (pid < 0) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong((long)pid);
}

PyDoc_STRVAR(pp_loaded_objects_doc,
             "loaded_objects($module, /)\n--\n\n"
             "The paths of the shared objects loaded into this process (dl_iterate_phdr: what "
             "/proc/self/maps would list, without the kernel formatting every mapping). For the "
             "pool's check for a foreign OpenMP runtime before it forks.");

static int
pp_collect_object(struct dl_phdr_info *info, size_t Py_UNUSED(size), void *data)
{
    if (info->dlpi_name == NULL || info->dlpi_name[0] == '\0') {
        return 0; /* the executable itself, the vDSO */
    }
    PyObject *name = PyUnicode_DecodeFSDefault(info->dlpi_name);
    if (name == NULL) {
        return 1;
    }
    int rc = PyList_Append((PyObject *)data, name);
    Py_DECREF(name);
    return rc < 0;
}

static PyObject *
pp_loaded_objects(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    PyObject *names = PyList_New(0);
    if (names == NULL) {
        return NULL;
    }
    /* The callback only allocates a str and appends it (no Python code runs, nothing
     * collects), under the loader's lock that dl_iterate_phdr holds meanwhile. */
    if (dl_iterate_phdr(pp_collect_object, names) != 0) {
        Py_DECREF(names);
        return NULL;
    }
    return names;
}

PyMethodDef pp_forkutil_methods[] = {
    {"fork", pp_fork, METH_NOARGS, pp_fork_doc},
    {"loaded_objects", pp_loaded_objects, METH_NOARGS, pp_loaded_objects_doc},
    {NULL, NULL, 0, NULL},
};
