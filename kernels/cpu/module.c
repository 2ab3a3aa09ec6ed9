/* sparsesr.kernels.cpu._sparseconv: the Python binding of run_conv (sparseconv.c).
 *
 * The Python side (kernels/cpu/__init__.py) passes each array as an (address, length) pair of
 * a contiguous float32 / int32 tensor. run_conv checks sizes, lengths and indices itself and
 * reports a status code, which becomes a one-line ValueError (or MemoryError) here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "sparseconv.h"

/* Bumped whenever conv2d's arguments change, so that the Python side can tell a stale build. */
#define ABI_VERSION 3

/* (address, length) -> array; both must be >= 0. */
static int parse_array(PyObject *pair, const char *name, const void **p, size_t *len)
{
    PyObject *address_obj;
    Py_ssize_t n;
    if (!PyTuple_Check(pair) || !PyArg_ParseTuple(pair, "On", &address_obj, &n) || !PyLong_Check(address_obj)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "_sparseconv.conv2d: %s must be an (address, length) tuple of ints", name);
        return 0;
    }
    const unsigned long long address = PyLong_AsUnsignedLongLong(address_obj); /* no silent wrap-around */
    if (address == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "_sparseconv.conv2d: %s has an address outside [0, 2**64)", name);
        return 0;
    }
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "_sparseconv.conv2d: %s has a negative length %zd", name, n);
        return 0;
    }
    *p = (const void *)(uintptr_t)address;
    *len = (size_t)n;
    return 1;
}

/* $name as a positive int, 0 when unset; junk or <= 0 counts as 1 (the smallest setting). */
static int env_positive(const char *name)
{
    const char *s = getenv(name);
    if (!s)
        return 0;
    errno = 0;
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || v <= 0)
        return 1;
    return errno == ERANGE || v > INT_MAX ? INT_MAX : (int)v;
}

PyDoc_STRVAR(conv2d_doc,
    "conv2d(x, out, residual, bias, slope, group_ptr, nz_k, nz_val, sizes, group, shuffle, relu, res_scale,\n"
    "       threads, isa, band_rows, band_cols, stream)\n"
    "Direct sparse convolution on (address, length) arrays; use sparsesr.kernels.cpu.conv2d instead.\n"
    "Arrays: float32 (int32 for group_ptr, nz_k), contiguous, (0, 0) for no residual / bias / slope.\n"
    "sizes: (n, c_in, h, w, c_out, kh, kw); isa: 0 scalar, 1 avx2, 2 avx512; stream: -1 auto.\n"
    "Everything is checked before the output is written: bad arguments raise ValueError.");

static PyObject *py_conv2d(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *arrays[8];
    static const char *names[8] = {"x", "out", "residual", "bias", "slope", "group_ptr", "nz_k", "nz_val"};
    ConvArgs a;
    RunOptions o;
    memset(&a, 0, sizeof a);
    memset(&o, 0, sizeof o);
    int relu;
    if (!PyArg_ParseTuple(args, "OOOOOOOO(iiiiiii)iipfiiiii", &arrays[0], &arrays[1], &arrays[2],
                          &arrays[3], &arrays[4], &arrays[5], &arrays[6], &arrays[7], &a.n, &a.c_in, &a.h, &a.w,
                          &a.c_out, &a.kh, &a.kw, &a.group, &a.shuffle, &relu, &a.res_scale, &o.threads,
                          &o.isa, &o.band_rows, &o.band_cols, &a.stream))
        return NULL;
    const void *p[8];
    size_t len[8];
    for (int i = 0; i < 8; i++)
        if (!parse_array(arrays[i], names[i], &p[i], &len[i]))
            return NULL;
    a.x = (FloatArray){p[0], len[0]};
    a.out = (OutArray){(float *)(uintptr_t)p[1], len[1]};
    a.residual = (FloatArray){p[2], len[2]};
    a.bias = (FloatArray){p[3], len[3]};
    a.slope = (FloatArray){p[4], len[4]};
    a.group_ptr = (IndexArray){p[5], len[5]};
    a.nz_k = (IndexArray){p[6], len[6]};
    a.nz_val = (FloatArray){p[7], len[7]};
    a.relu = relu;
    /* read with the GIL held: another Python thread may be changing os.environ */
    o.chunk = env_positive("SPARSESR_CPU_CHUNK");
    const char *pool = getenv("SPARSESR_CPU_POOL");
    o.own_threads = pool && strcmp(pool, "pthreads") == 0;

    char msg[256] = "";
    ScStatus status;
    Py_BEGIN_ALLOW_THREADS
    status = run_conv(&a, &o, msg, sizeof msg);
    Py_END_ALLOW_THREADS
    if (status == SC_OK)
        Py_RETURN_NONE;
    if (status == SC_NO_MEMORY)
        return PyErr_NoMemory();
    PyErr_Format(PyExc_ValueError, "_sparseconv.conv2d: %s", msg);
    return NULL;
}

static PyObject *py_isa_supported(PyObject *self, PyObject *arg)
{
    (void)self;
    long isa = PyLong_AsLong(arg);
    if (isa == -1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(isa >= 0 && isa < ISA_COUNT && (isa_mask() >> isa & 1u));
}

static PyMethodDef methods[] = {
    {"conv2d", py_conv2d, METH_VARARGS, conv2d_doc},
    {"isa_supported", py_isa_supported, METH_O,
     "isa_supported(isa) -> bool: 0 scalar, 1 avx2, 2 avx512 (detected once, at import)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sparseconv", "Direct sparse convolution kernels ((address, length) arrays).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sparseconv(void)
{
    sparseconv_init();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "ABI_VERSION", ABI_VERSION) != 0 ||
              PyModule_AddIntConstant(m, "ISAS_COMPILED", (long)isa_compiled()) != 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
