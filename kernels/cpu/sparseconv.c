/* sparsesr.kernels.cpu._sparseconv: direct sparse convolution on the CPU.
 *
 * The Python side (kernels/cpu/__init__.py) passes raw pointers of contiguous float32 / int32
 * tensors; this file splits the output into tiles (image x band of rows x block of columns),
 * copies each tile's input window into a small zero-padded buffer that stays in L2, and runs the
 * ISA-specific tile kernel (tile_template.h) on it, on a few POSIX threads with the GIL released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sparseconv.h"

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

/* Widest vector of any ISA, in floats: reads of a partial last vector may run this far past
 * a buffer row. */
#define MAX_VW 16

static int isa_supported(int isa)
{
    if (isa == ISA_SCALAR)
        return 1;
#ifdef SPARSECONV_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

typedef void (*TileFn)(const Tile *);

static TileFn tile_function(int isa)
{
#ifdef SPARSECONV_X86
    if (isa == ISA_AVX2)
        return tile_avx2;
    if (isa == ISA_AVX512)
        return tile_avx512;
#endif
    (void)isa;
    return tile_scalar;
}

/* ---- tiling ---------------------------------------------------------------------------------- */

typedef struct {
    const ConvArgs *a;
    TileFn fn;
    int band_rows, band_cols;   /* tile size */
    int n_bands, n_colblocks, n_tiles;
    int wp;                     /* buffer row stride = band_cols + kw - 1 */
    size_t cs;                  /* buffer channel stride */
    int n_chunks;               /* input-channel chunks (see Tile) */
    const int32_t *seg_ptr, *off;
    const float *val;
    atomic_int next_tile;
    atomic_int failed;
} Job;

/* Ask for n floats from p to be brought into the cache. */
static void prefetch_floats(const float *p, int n)
{
#if defined(__GNUC__)
    for (int i = 0; i < n; i += 64 / (int)sizeof(float))
        __builtin_prefetch(p + i);
#else
    (void)p, (void)n;
#endif
}

/* Copy the input window of a tile into buf, zero outside the image. Each channel's rows are a
 * new stream far from the last one, which the hardware prefetcher would only pick up after a
 * few misses: the next channel's row is prefetched while this one is copied (fill 30 % faster). */
static void fill_buffer(const Job *job, float *buf, int img, int y0, int x0, int cols)
{
    const ConvArgs *a = job->a;
    const int ph = a->kh / 2, pw = a->kw / 2;
    const int buf_rows = job->band_rows + a->kh - 1;
    const int need = cols + a->kw - 1; /* buffer columns this tile reads */
    const int x_first = x0 - pw;
    int lo = x_first < 0 ? -x_first : 0;                 /* first column inside the image */
    int hi = x_first + need > a->w ? a->w - x_first : need; /* one past the last */
    for (int c = 0; c < a->c_in; c++) {
        const float *plane = a->x + ((size_t)img * a->c_in + c) * a->h * a->w;
        for (int i = 0; i < buf_rows; i++) {
            float *dst = buf + c * job->cs + (size_t)i * job->wp;
            const int y = y0 - ph + i;
            if (y < 0 || y >= a->h) {
                memset(dst, 0, (size_t)job->wp * sizeof(float));
                continue;
            }
            const float *src = plane + (size_t)y * a->w + x_first;
            if (c + 1 < a->c_in)
                prefetch_floats(src + (size_t)a->h * a->w + lo, hi - lo); /* next channel's row */
            /* the zero margins are a few floats: plain loops, not library calls */
            for (int j = 0; j < lo; j++)
                dst[j] = 0.0f;
            memcpy(dst + lo, src + lo, (size_t)(hi - lo) * sizeof(float));
            for (int j = hi; j < job->wp; j++)
                dst[j] = 0.0f;
        }
    }
}

static void *worker(void *arg)
{
    Job *job = arg;
    const ConvArgs *a = job->a;
    /* calloc: the slack after each channel's rows is read by partial vectors and never written */
    float *buf = calloc((size_t)a->c_in * job->cs + MAX_VW, sizeof(float));
    float *stage = malloc((size_t)a->n_groups * STAGE_PER_GROUP * sizeof(float));
    if (!buf || !stage) {
        free(buf);
        free(stage);
        atomic_store(&job->failed, 1);
        return NULL;
    }
    Tile t = {.a = a, .buf = buf, .wp = job->wp, .n_chunks = job->n_chunks,
              .seg_ptr = job->seg_ptr, .off = job->off, .val = job->val, .stage = stage};
    for (;;) {
        int id = atomic_fetch_add(&job->next_tile, 1);
        if (id >= job->n_tiles || atomic_load(&job->failed))
            break;
        const int cb = id % job->n_colblocks;
        const int band = (id / job->n_colblocks) % job->n_bands;
        t.img = id / (job->n_colblocks * job->n_bands);
        t.y0 = band * job->band_rows;
        t.x0 = cb * job->band_cols;
        t.rows = a->h - t.y0 < job->band_rows ? a->h - t.y0 : job->band_rows;
        t.cols = a->w - t.x0 < job->band_cols ? a->w - t.x0 : job->band_cols;
        fill_buffer(job, buf, t.img, t.y0, t.x0, t.cols);
        job->fn(&t);
    }
    free(buf);
    free(stage);
    return NULL;
}

/* ---- threads ---------------------------------------------------------------------------------- */

/* torch runs its ops on an OpenMP team whose idle threads keep spinning for a few milliseconds
 * after each op. Threads of our own would share the cores with those spinners (measured: a layer
 * right after a dense torch conv took twice as long on 2 threads). So when the process has an
 * OpenMP runtime loaded (torch's libgomp, or another one with libgomp's entry points), the
 * workers run on that runtime's team: GOMP_parallel(fn, data, threads, flags) runs fn(data) on
 * `threads` threads, the caller included, reusing the spinning ones. Without one, with
 * $SPARSESR_CPU_POOL=pthreads, or in a child forked from the process that loaded this module
 * (libgomp's team does not survive fork: the call would hang), each call starts POSIX threads. */
typedef void (*GompParallel)(void (*fn)(void *), void *data, unsigned threads, unsigned flags);

static GompParallel gomp_parallel;
static pthread_once_t gomp_once = PTHREAD_ONCE_INIT;
static pid_t loader_pid; /* set when the module is imported */

static void find_gomp_parallel(void)
{
#ifdef RTLD_DEFAULT
    void *symbol = dlsym(RTLD_DEFAULT, "GOMP_parallel");
    memcpy(&gomp_parallel, &symbol, sizeof symbol); /* object -> function pointer, as POSIX allows */
#endif
}

static void gomp_worker(void *job)
{
    worker(job);
}

static void run_workers(Job *job, int threads)
{
    const char *pool = getenv("SPARSESR_CPU_POOL");
    pthread_once(&gomp_once, find_gomp_parallel);
    if (threads > 1 && gomp_parallel && getpid() == loader_pid && !(pool && strcmp(pool, "pthreads") == 0)) {
        gomp_parallel(gomp_worker, job, (unsigned)threads, 0);
        return;
    }
    pthread_t *ids = threads > 1 ? calloc((size_t)threads, sizeof(pthread_t)) : NULL;
    int started = 0;
    if (ids)
        for (; started < threads - 1; started++)
            if (pthread_create(&ids[started], NULL, worker, job) != 0)
                break; /* fewer threads is still correct */
    worker(job); /* the calling thread works too */
    for (int i = 0; i < started; i++)
        pthread_join(ids[i], NULL);
    free(ids);
}

/* Pick a tile size whose padded input window (all input channels) stays around `budget` bytes,
 * so it is read from L2 while every output channel of the tile is computed. */
static void choose_tile(const ConvArgs *a, int threads, int *rows, int *cols)
{
    const size_t budget = 320 * 1024; /* of a 512 KiB L2: room for weights and outputs */
    if (*cols <= 0) {
        int blocks = (a->w + 255) / 256;
        *cols = (a->w + blocks - 1) / blocks;
    }
    if (*rows <= 0) {
        size_t row_bytes = (size_t)a->c_in * (*cols + a->kw - 1) * sizeof(float);
        long r = (long)(budget / (row_bytes ? row_bytes : 1)) - (a->kh - 1);
        if (r < 1)
            r = 1;
        if (r > a->h)
            r = a->h;
        /* enough tiles to keep every thread busy until the end */
        long per_band = (long)a->n * ((a->w + *cols - 1) / *cols);
        while (r > 1 && per_band * ((a->h + r - 1) / r) < 4L * threads)
            r = (r + 1) / 2;
        *rows = (int)r;
    }
}

/* Input channels per chunk: as many as keep their input under one register tile within 24 KiB
 * of L1 (32 KiB, the rest for the weights streaming through), for the AVX2 register tiles:
 * 3 rows x 32 pixels for unstructured groups, 1 row x 16 pixels for blocks, plus the kernel's
 * halo. Chunks are then evened out. Measured here (1 thread, 90 % sparse): a 64-channel 3x3
 * unstructured layer is 13 % faster in 2 chunks of 32 than in one; blocks are fastest in one
 * (64 channels) and in 3-4 chunks at 256 channels. $SPARSESR_CPU_CHUNK overrides it (tuning). */
static int chunk_channels(const ConvArgs *a)
{
    const char *forced = getenv("SPARSESR_CPU_CHUNK");
    if (forced)
        return atoi(forced) > 0 ? atoi(forced) : 1;
    const int rows = a->group == 1 ? 3 : 1, width = a->group == 1 ? 32 : 16;
    const int bytes_per_channel = (rows + a->kh - 1) * (width + a->kw - 1) * (int)sizeof(float);
    int chunk = 24 * 1024 / bytes_per_channel;
    if (chunk < 1)
        chunk = 1;
    const int n_chunks = (a->c_in + chunk - 1) / chunk;
    return (a->c_in + n_chunks - 1) / n_chunks;
}

/* Reorder the nonzeros chunk-major (see Tile) and turn positions into buffer offsets. The
 * offset and chunk of every position k are tabulated first: K divisions instead of several per
 * nonzero (this took 2 % of a 90 %-sparse 64-channel layer, serial before the threads start). */
static int reorder_entries(const ConvArgs *a, Job *job)
{
    const int taps = a->kh * a->kw, n_groups = a->n_groups, G = a->group;
    const int chunk = chunk_channels(a);
    const int n_chunks = (a->c_in + chunk - 1) / chunk;
    const int n_k = a->c_in * taps;
    const size_t nnz = (size_t)a->group_ptr[n_groups];
    const size_t n_segs = (size_t)n_chunks * n_groups;
    int32_t *seg_ptr = calloc(n_segs + 1, sizeof(int32_t));
    int32_t *off = malloc((nnz ? nnz : 1) * sizeof(int32_t));
    float *val = malloc((nnz ? nnz : 1) * G * sizeof(float));
    int32_t *k_off = malloc((size_t)n_k * sizeof(int32_t));
    int32_t *k_seg = malloc((size_t)n_k * sizeof(int32_t)); /* first segment of k's chunk */
    if (!seg_ptr || !off || !val || !k_off || !k_seg) {
        free(seg_ptr);
        free(off);
        free(val);
        free(k_off);
        free(k_seg);
        return -1;
    }
    for (int k = 0; k < n_k; k++) {
        const int c = k / taps, ky = (k % taps) / a->kw, kx = k % a->kw;
        k_off[k] = (int32_t)(c * job->cs + (size_t)ky * job->wp + kx);
        k_seg[k] = (c / chunk) * n_groups;
    }
    for (int g = 0; g < n_groups; g++) /* count the entries of every (chunk, group) segment */
        for (int i = a->group_ptr[g]; i < a->group_ptr[g + 1]; i++)
            seg_ptr[(size_t)k_seg[a->nz_k[i]] + g + 1]++;
    for (size_t s = 0; s < n_segs; s++)
        seg_ptr[s + 1] += seg_ptr[s];
    for (int g = 0; g < n_groups; g++) {
        /* entries of a group ascend in k, hence in chunk: copy them in order */
        for (int i = a->group_ptr[g]; i < a->group_ptr[g + 1]; i++) {
            const int k = a->nz_k[i];
            const int32_t j = seg_ptr[(size_t)k_seg[k] + g]++; /* for now the segment's fill position */
            off[j] = k_off[k];
            for (int m = 0; m < G; m++)
                val[(size_t)j * G + m] = a->nz_val[(size_t)i * G + m];
        }
    }
    for (size_t s = n_segs; s > 0; s--) /* undo the fill positions: back to segment starts */
        seg_ptr[s] = seg_ptr[s - 1];
    seg_ptr[0] = 0;
    free(k_off);
    free(k_seg);
    job->n_chunks = n_chunks;
    job->seg_ptr = seg_ptr;
    job->off = off;
    job->val = val;
    return 0;
}

/* Returns 0 on success, -1 when out of memory, -2 when the window is too large for int32. */
static int run_conv(const ConvArgs *a, int isa, int threads, int band_rows, int band_cols)
{
    Job job;
    memset(&job, 0, sizeof job);
    job.a = a;
    job.fn = tile_function(isa);
    if (band_cols > a->w)
        band_cols = a->w;
    if (band_rows > a->h)
        band_rows = a->h;
    choose_tile(a, threads, &band_rows, &band_cols);
    job.band_rows = band_rows;
    job.band_cols = band_cols;
    job.n_bands = (a->h + band_rows - 1) / band_rows;
    job.n_colblocks = (a->w + band_cols - 1) / band_cols;
    job.n_tiles = a->n * job.n_bands * job.n_colblocks;
    job.wp = band_cols + a->kw - 1;
    /* channel stride: room for partial-vector overrun, and an odd number of cache lines so
     * that the same pixel of different channels does not map to the same L1 set */
    size_t cs = (size_t)(band_rows + a->kh - 1) * job.wp + MAX_VW;
    cs = (cs + 15) / 16 * 16;
    if ((cs / 16) % 2 == 0)
        cs += 16;
    job.cs = cs;
    if ((double)cs * a->c_in + MAX_VW >= 2147483647.0)
        return -2;

    if (reorder_entries(a, &job) != 0)
        return -1;
    if (threads > job.n_tiles)
        threads = job.n_tiles;
    if (threads < 1)
        threads = 1;
    run_workers(&job, threads);
    free((void *)job.seg_ptr);
    free((void *)job.off);
    free((void *)job.val);
    return atomic_load(&job.failed) ? -1 : 0;
}

/* ---- Python binding ------------------------------------------------------------------------- */

static void *as_ptr(unsigned long long p)
{
    return (void *)(uintptr_t)p;
}

PyDoc_STRVAR(conv2d_doc,
    "conv2d(x, out, n, c_in, h, w, c_out, kh, kw, group, n_groups, group_ptr, nz_k, nz_val,\n"
    "       bias, relu, residual, res_scale, threads, isa, band_rows, band_cols, stream=-1, shuffle=1)\n"
    "Raw-pointer direct sparse convolution; use sparsesr.kernels.cpu.conv2d instead.\n"
    "Pointers are integers (0 for no bias / residual); isa: 0 scalar, 1 avx2, 2 avx512.");

static PyObject *py_conv2d(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long x, out, group_ptr, nz_k, nz_val, bias, residual;
    int n, c_in, h, w, c_out, kh, kw, group, n_groups, relu, threads, isa, band_rows, band_cols;
    int stream = -1, shuffle = 1;
    float res_scale;
    if (!PyArg_ParseTuple(args, "KKiiiiiiiiiKKKKpKfiiii|ii", &x, &out, &n, &c_in, &h, &w, &c_out,
                          &kh, &kw, &group, &n_groups, &group_ptr, &nz_k, &nz_val, &bias, &relu,
                          &residual, &res_scale, &threads, &isa, &band_rows, &band_cols, &stream,
                          &shuffle))
        return NULL;
    if (n < 1 || c_in < 1 || h < 1 || w < 1 || c_out < 1 || kh < 1 || kw < 1 || kh % 2 == 0 ||
        kw % 2 == 0 || (group != 1 && group != 4) || n_groups != (c_out + group - 1) / group ||
        shuffle < 1 || c_out % (shuffle * shuffle) != 0 || (shuffle > 1 && residual) ||
        !x || !out || !group_ptr ||
        ((!nz_k || !nz_val) && ((const int32_t *)as_ptr(group_ptr))[n_groups] > 0)) {
        PyErr_SetString(PyExc_ValueError, "_sparseconv.conv2d: invalid sizes or null pointer");
        return NULL;
    }
    if (isa < ISA_SCALAR || isa > ISA_AVX512 || !isa_supported(isa)) {
        PyErr_Format(PyExc_ValueError, "_sparseconv.conv2d: ISA %d is not supported here", isa);
        return NULL;
    }
    ConvArgs a = {
        .x = as_ptr(x), .out = as_ptr(out), .residual = as_ptr(residual), .bias = as_ptr(bias),
        .n = n, .c_in = c_in, .h = h, .w = w, .c_out = c_out, .kh = kh, .kw = kw,
        .relu = relu, .stream = stream, .shuffle = shuffle, .res_scale = res_scale, .group = group,
        .n_groups = n_groups,
        .group_ptr = as_ptr(group_ptr), .nz_k = as_ptr(nz_k), .nz_val = as_ptr(nz_val),
    };
    if (stream < 0) /* auto: stream outputs that do not fit the L2 caches anyway */
        a.stream = (double)n * c_out * h * w * sizeof(float) > 2.0 * 1024 * 1024;
    if (shuffle > 1) /* strided single-float stores: streaming ones would write partial lines */
        a.stream = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_conv(&a, isa, threads, band_rows, band_cols);
    Py_END_ALLOW_THREADS
    if (status == -1)
        return PyErr_NoMemory();
    if (status == -2) {
        PyErr_SetString(PyExc_ValueError, "_sparseconv.conv2d: input window too large");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_isa_supported(PyObject *self, PyObject *arg)
{
    (void)self;
    long isa = PyLong_AsLong(arg);
    if (isa == -1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(isa >= ISA_SCALAR && isa <= ISA_AVX512 && isa_supported((int)isa));
}

static PyMethodDef methods[] = {
    {"conv2d", py_conv2d, METH_VARARGS, conv2d_doc},
    {"isa_supported", py_isa_supported, METH_O,
     "isa_supported(isa) -> bool: 0 scalar, 1 avx2, 2 avx512."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sparseconv", "Direct sparse convolution kernels (raw pointers).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sparseconv(void)
{
    loader_pid = getpid();
    return PyModule_Create(&module);
}
