/* module.c: pyparallel._core registration only. Multi-phase init (PEP 489) with module state;
 * each concern's file adds its own types and functions from its exec hook. */
#include "pp.h"
#include "queue.h"

PyDoc_STRVAR(pp_set_default_threads_doc,
             "set_default_threads($module, n, /)\n--\n\n"
             "Team size used when a call passes threads=None (the package sets it from "
             "cpu_count()).");

static PyObject *
pp_set_default_threads(PyObject *module, PyObject *arg)
{
    int t = pp_threads_arg(module, arg);
    if (t < 0) {
        return NULL;
    }
    pp_get_state(module)->default_threads = t;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pp_get_default_threads_doc, "get_default_threads($module, /)\n--\n\n"
                                         "Team size used when a call passes threads=None.");

static PyObject *
pp_get_default_threads(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(pp_get_state(module)->default_threads);
}

static PyMethodDef pp_module_methods[] = {
    {"set_default_threads", pp_set_default_threads, METH_O, pp_set_default_threads_doc},
    {"get_default_threads", pp_get_default_threads, METH_NOARGS, pp_get_default_threads_doc},
    {"team_thread_ids", pp_team_thread_ids, METH_NOARGS,
     "team_thread_ids($module, /)\n--\n\n"
     "OS thread ids of the kernels' thread team. They survive fork() safely (see team.c),\n"
     "so the Pool's fork-safety rule does not count them."},
    {NULL, NULL, 0, NULL},
};

static int
pp_exec(PyObject *module)
{
    pp_state *st = pp_get_state(module);
    st->default_threads = 1;
    if (PyModule_AddStringConstant(module, "__version__", PP_VERSION) < 0) {
        return -1;
    }
#ifdef PP_HAVE_OPENMP
    int openmp = 1;
#else
    int openmp = 0;
#endif
    if (PyModule_AddObjectRef(module, "HAVE_OPENMP", openmp ? Py_True : Py_False) < 0) {
        return -1;
    }
    if (pp_kernels_exec(module, st) < 0) {
        return -1;
    }
    if (pp_shm_exec(module, st) < 0 || pp_sync_exec(module, st) < 0 ||
        pp_channel_exec(module, st) < 0 || PyModule_AddFunctions(module, pp_codec_methods) < 0 ||
        PyModule_AddFunctions(module, pp_forkutil_methods) < 0) {
        return -1;
    }
    if (pp_queue_exec(module, st) < 0) {
        return -1;
    }
    return 0;
}

static int
pp_traverse(PyObject *module, visitproc visit, void *arg)
{
    pp_state *st = pp_get_state(module);
#define PP_VISIT_FIELD(name) Py_VISIT(st->name);
    PP_STATE_OBJECTS(PP_VISIT_FIELD)
#undef PP_VISIT_FIELD
    return 0;
}

static int
pp_clear(PyObject *module)
{
    pp_state *st = pp_get_state(module);
#define PP_CLEAR_FIELD(name) Py_CLEAR(st->name);
    PP_STATE_OBJECTS(PP_CLEAR_FIELD)
#undef PP_CLEAR_FIELD
    return 0;
}

static void
pp_free(void *module)
{
    (void)pp_clear((PyObject *)module);
}

static PyModuleDef_Slot pp_slots[] = {
    {Py_mod_exec, pp_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

PyModuleDef pp_moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyparallel._core",
    .m_doc = "pyparallel's C core: kernels, thread teams, shared memory, channels. Internal: "
             "use the pyparallel package.",
    .m_size = sizeof(pp_state),
    .m_methods = pp_module_methods,
    .m_slots = pp_slots,
    .m_traverse = pp_traverse,
    .m_clear = pp_clear,
    .m_free = pp_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&pp_moduledef);
}
