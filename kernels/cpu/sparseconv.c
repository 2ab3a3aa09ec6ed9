/* Direct sparse convolution on the CPU: argument checks, tiling and threads (no Python here;
 * the binding is module.c).
 *
 * run_conv first checks every size and array length it is given, then copies and checks the
 * weight indices, and only then touches the output. It splits the output into tiles (image x
 * band of rows x block of columns), copies each tile's input window into a small zero-padded
 * buffer that stays in L2, and runs the ISA-specific tile kernel (tile_template.h) on it.
 */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sparseconv.h"

/* Widest vector of any ISA, in floats: reads of a partial last vector may run this far past
 * a buffer row. */
#define MAX_VW 16

typedef void (*TileFn)(const Tile *);

static unsigned supported_isas; /* bit per ISA_* code, set once by sparseconv_init */
static pid_t loader_pid;        /* the process that loaded the module (see run_workers) */

void sparseconv_init(void)
{
    supported_isas = 1u << ISA_SCALAR;
#ifdef SPARSECONV_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        supported_isas |= 1u << ISA_AVX2;
    if (__builtin_cpu_supports("avx512f"))
        supported_isas |= 1u << ISA_AVX512;
#endif
    loader_pid = getpid();
}

unsigned isa_mask(void)
{
    return supported_isas;
}

unsigned isa_compiled(void)
{
#ifdef SPARSECONV_X86
    return 1u << ISA_SCALAR | 1u << ISA_AVX2 | 1u << ISA_AVX512;
#else
    return 1u << ISA_SCALAR;
#endif
}

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

/* ---- argument checks -------------------------------------------------------------------------- */

#define FAIL(code, ...)                      \
    do {                                     \
        snprintf(msg, cap, __VA_ARGS__);     \
        return (code);                       \
    } while (0)

/* *r = a * b, or 0 when that overflows size_t. */
static int mul_size(size_t a, size_t b, size_t *r)
{
    if (b && a > SIZE_MAX / b)
        return 0;
    *r = a * b;
    return 1;
}

static int overlaps(const void *a, size_t a_bytes, const void *b, size_t b_bytes)
{
    const uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
    return a_bytes && b_bytes && a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

/* An array of len elements of `size` bytes must be non-NULL and aligned when it has any. */
static int bad_pointer(const void *p, size_t len, size_t size)
{
    return len && (!p || (uintptr_t)p % size != 0);
}

/* Sizes, lengths and pointers (the weights' index values are checked by copy_indices). */
static ScStatus check_args(ConvArgs *a, const RunOptions *o, char *msg, size_t cap)
{
    if (a->n < 1 || a->c_in < 1 || a->h < 1 || a->w < 1 || a->c_out < 1)
        FAIL(SC_BAD_SIZE, "sizes must be >= 1, got n=%d c_in=%d h=%d w=%d c_out=%d", a->n, a->c_in,
             a->h, a->w, a->c_out);
    if (a->kh < 1 || a->kw < 1 || a->kh % 2 == 0 || a->kw % 2 == 0)
        FAIL(SC_BAD_SIZE, "kernel size must be odd and >= 1, got %dx%d", a->kh, a->kw);
    if (a->group != 1 && a->group != 4)
        FAIL(SC_BAD_SIZE, "group must be 1 or 4 output channels, got %d", a->group);
    if (a->shuffle < 1 || a->c_out % ((long long)a->shuffle * a->shuffle) != 0)
        FAIL(SC_BAD_SIZE, "shuffle must be >= 1 with shuffle^2 dividing c_out=%d, got %d", a->c_out,
             a->shuffle);
    if (a->shuffle > 1 && a->residual.len)
        FAIL(SC_BAD_SIZE, "shuffle > 1 cannot be combined with a residual");
    if (o->isa < 0 || o->isa >= ISA_COUNT || !(supported_isas >> o->isa & 1u))
        FAIL(SC_BAD_ISA, "ISA %d is not supported on this CPU (supported mask %u)", o->isa, supported_isas);
    /* every padded size and position must fit the int32 offsets and loops of the kernel */
    const long long k_total = (long long)a->c_in * a->kh * a->kw;
    if (k_total > INT32_MAX || (long long)a->h + a->kh > INT32_MAX || (long long)a->w + a->kw > INT32_MAX)
        FAIL(SC_TOO_LARGE, "c_in * kh * kw = %lld positions or a padded %dx%d image exceed int32", k_total,
             a->h, a->w);

    size_t pixels, in_len, out_len, in_bytes, out_bytes;
    if (!mul_size((size_t)a->n, (size_t)a->h, &pixels) || !mul_size(pixels, (size_t)a->w, &pixels) ||
        !mul_size(pixels, (size_t)a->c_in, &in_len) || !mul_size(pixels, (size_t)a->c_out, &out_len) ||
        !mul_size(in_len, sizeof(float), &in_bytes) || !mul_size(out_len, sizeof(float), &out_bytes))
        FAIL(SC_TOO_LARGE, "n * c * h * w * 4 bytes overflows size_t");
    if (a->x.len != in_len)
        FAIL(SC_BAD_LENGTH, "x has %zu floats, expected n*c_in*h*w = %zu", a->x.len, in_len);
    if (a->out.len != out_len)
        FAIL(SC_BAD_LENGTH, "out has %zu floats, expected n*c_out*h*w = %zu", a->out.len, out_len);
    if (a->residual.len && a->residual.len != out_len)
        FAIL(SC_BAD_LENGTH, "residual has %zu floats, expected n*c_out*h*w = %zu", a->residual.len, out_len);
    if (a->bias.len && a->bias.len != (size_t)a->c_out)
        FAIL(SC_BAD_LENGTH, "bias has %zu floats, expected c_out = %d", a->bias.len, a->c_out);
    if (a->slope.len > 1 && a->slope.len != (size_t)a->c_out)
        FAIL(SC_BAD_LENGTH, "slope has %zu floats, expected 1 (LeakyReLU) or c_out = %d (PReLU)", a->slope.len,
             a->c_out);
    if (a->slope.len && a->relu)
        FAIL(SC_BAD_SIZE, "relu and a negative slope are exclusive (ReLU is slope 0: pass one of them)");

    a->n_groups = (int)(((long long)a->c_out + a->group - 1) / a->group);
    if (a->group_ptr.len != (size_t)a->n_groups + 1)
        FAIL(SC_BAD_LENGTH, "group_ptr has %zu entries, expected ceil(c_out / group) + 1 = %lld",
             a->group_ptr.len, (long long)a->n_groups + 1);
    if (a->nz_k.len > INT32_MAX)
        FAIL(SC_TOO_LARGE, "nz_k has %zu entries, at most %d are supported", a->nz_k.len, INT32_MAX);
    if (a->nz_val.len != a->nz_k.len * (size_t)a->group)
        FAIL(SC_BAD_LENGTH, "nz_val has %zu values, expected %d per entry of nz_k = %zu", a->nz_val.len,
             a->group, a->nz_k.len * (size_t)a->group);

    if (bad_pointer(a->x.p, a->x.len, sizeof(float)) || bad_pointer(a->out.p, a->out.len, sizeof(float)) ||
        bad_pointer(a->residual.p, a->residual.len, sizeof(float)) ||
        bad_pointer(a->bias.p, a->bias.len, sizeof(float)) || bad_pointer(a->slope.p, a->slope.len, sizeof(float)) ||
        bad_pointer(a->group_ptr.p, a->group_ptr.len, sizeof(int32_t)) ||
        bad_pointer(a->nz_k.p, a->nz_k.len, sizeof(int32_t)) ||
        bad_pointer(a->nz_val.p, a->nz_val.len, sizeof(float)))
        FAIL(SC_BAD_POINTER, "an array is NULL or not aligned to its element size");
    /* the tile kernels test the pointers: an empty optional array is none */
    if (!a->residual.len)
        a->residual.p = NULL;
    if (!a->bias.len)
        a->bias.p = NULL;
    if (!a->slope.len)
        a->slope.p = NULL;
    /* tiles read x, the residual and the bias while others write out */
    if (overlaps(a->out.p, out_bytes, a->x.p, in_bytes) ||
        overlaps(a->out.p, out_bytes, a->residual.p, a->residual.len * sizeof(float)) ||
        overlaps(a->out.p, out_bytes, a->bias.p, a->bias.len * sizeof(float)) ||
        overlaps(a->out.p, out_bytes, a->slope.p, a->slope.len * sizeof(float)))
        FAIL(SC_BAD_POINTER, "out overlaps x, the residual, the bias or the slope");
    if (a->stream < 0) /* auto: stream outputs that do not fit the L2 caches anyway */
        a->stream = (double)out_bytes > 2.0 * 1024 * 1024;
    if (a->shuffle > 1) /* strided single-float stores: streaming ones would write partial lines */
        a->stream = 0;
    return SC_OK;
}

/* The weights' indices, copied once (so nothing can change them between check and use) and
 * checked: group pointers from 0, never decreasing, to nnz; positions in [0, c_in*kh*kw). */
static ScStatus copy_indices(const ConvArgs *a, int32_t *gp, int32_t *ks, char *msg, size_t cap)
{
    const int n_groups = a->n_groups;
    const int32_t nnz = (int32_t)a->nz_k.len;
    const int32_t k_total = a->c_in * a->kh * a->kw;
    memcpy(gp, a->group_ptr.p, ((size_t)n_groups + 1) * sizeof(int32_t));
    if (gp[0] != 0)
        FAIL(SC_BAD_WEIGHTS, "group_ptr[0] = %d, expected 0", gp[0]);
    for (int g = 0; g < n_groups; g++)
        if (gp[g + 1] < gp[g])
            FAIL(SC_BAD_WEIGHTS, "group_ptr decreases: group_ptr[%d] = %d < group_ptr[%d] = %d", g + 1,
                 gp[g + 1], g, gp[g]);
    if (gp[n_groups] != nnz)
        FAIL(SC_BAD_WEIGHTS, "group_ptr[%d] = %d, expected the %d entries of nz_k", n_groups, gp[n_groups], nnz);
    if (nnz)
        memcpy(ks, a->nz_k.p, (size_t)nnz * sizeof(int32_t));
    for (int32_t i = 0; i < nnz; i++)
        if (ks[i] < 0 || ks[i] >= k_total)
            FAIL(SC_BAD_WEIGHTS, "nz_k[%d] = %d, expected a position in [0, c_in*kh*kw = %d)", i, ks[i], k_total);
    return SC_OK;
}

#undef FAIL

/* ---- tiling ---------------------------------------------------------------------------------- */

typedef struct {
    const ConvArgs *a;
    TileFn fn;
    int band_rows, band_cols;   /* tile size */
    int n_bands, n_colblocks;
    long long n_tiles;
    int wp;                     /* buffer row stride = band_cols + kw - 1 */
    size_t cs;                  /* buffer channel stride */
    int n_chunks;               /* input-channel chunks (see Tile) */
    const int32_t *seg_ptr, *off;
    const float *val;
    atomic_llong next_tile;
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
    const int x_first = x0 - pw;       /* image column of buffer column 0, may be < 0 */
    const int lo = x_first < 0 ? -x_first : 0;                   /* first column inside the image */
    const int hi = x_first + need > a->w ? a->w - x_first : need; /* one past the last */
    const size_t plane_len = (size_t)a->h * a->w;
    for (int c = 0; c < a->c_in; c++) {
        const float *plane = a->x.p + ((size_t)img * a->c_in + c) * plane_len;
        for (int i = 0; i < buf_rows; i++) {
            float *dst = buf + c * job->cs + (size_t)i * job->wp;
            const int y = y0 - ph + i;
            if (y < 0 || y >= a->h) {
                memset(dst, 0, (size_t)job->wp * sizeof(float));
                continue;
            }
            /* the row's first column inside the image: no pointer before the array is formed */
            const float *src = plane + (size_t)y * a->w + (x_first + lo);
            if (c + 1 < a->c_in)
                prefetch_floats(src + plane_len, hi - lo); /* next channel's row */
            /* the zero margins are a few floats: plain loops, not library calls */
            for (int j = 0; j < lo; j++)
                dst[j] = 0.0f;
            memcpy(dst + lo, src, (size_t)(hi - lo) * sizeof(float));
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
        const long long id = atomic_fetch_add(&job->next_tile, 1);
        if (id >= job->n_tiles || atomic_load(&job->failed))
            break;
        const int cb = (int)(id % job->n_colblocks);
        const int band = (int)(id / job->n_colblocks % job->n_bands);
        t.img = (int)(id / ((long long)job->n_colblocks * job->n_bands));
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
 * own_threads ($SPARSESR_CPU_POOL=pthreads), or in a child forked from the process that loaded
 * this module (libgomp's team does not survive fork: the call would hang), each call starts
 * POSIX threads. */
typedef void (*GompParallel)(void (*fn)(void *), void *data, unsigned threads, unsigned flags);

static GompParallel gomp_parallel;
static pthread_once_t gomp_once = PTHREAD_ONCE_INIT;

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

static void run_workers(Job *job, int threads, int own_threads)
{
    pthread_once(&gomp_once, find_gomp_parallel);
    if (threads > 1 && gomp_parallel && getpid() == loader_pid && !own_threads) {
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
        size_t row_bytes = (size_t)a->c_in * ((size_t)*cols + a->kw - 1) * sizeof(float);
        long long r = (long long)(budget / row_bytes) - (a->kh - 1);
        if (r < 1)
            r = 1;
        if (r > a->h)
            r = a->h;
        /* enough tiles to keep every thread busy until the end */
        long long per_band = (long long)a->n * ((a->w + *cols - 1) / *cols);
        while (r > 1 && per_band * ((a->h + r - 1) / r) < 4LL * threads)
            r = (r + 1) / 2;
        *rows = (int)r;
    }
}

/* Input channels per chunk: as many as keep their input under one register tile within 24 KiB
 * of L1 (32 KiB, the rest for the weights streaming through), for the AVX2 register tiles:
 * 3 rows x 32 pixels for unstructured groups, 1 row x 16 pixels for blocks, plus the kernel's
 * halo. Chunks are then evened out. Measured here (1 thread, 90 % sparse): a 64-channel 3x3
 * unstructured layer is 13 % faster in 2 chunks of 32 than in one; blocks are fastest in one
 * (64 channels) and in 3-4 chunks at 256 channels. `forced` > 0 overrides it (tuning). */
static int chunk_channels(const ConvArgs *a, int forced)
{
    if (forced > 0)
        return forced < a->c_in ? forced : a->c_in;
    const long long rows = a->group == 1 ? 3 : 1, width = a->group == 1 ? 32 : 16;
    const long long bytes_per_channel = (rows + a->kh - 1) * (width + a->kw - 1) * (long long)sizeof(float);
    long long chunk = 24 * 1024 / bytes_per_channel;
    if (chunk < 1)
        chunk = 1;
    const long long n_chunks = (a->c_in + chunk - 1) / chunk;
    return (int)((a->c_in + n_chunks - 1) / n_chunks);
}

/* Check the weights (copy_indices), then reorder the nonzeros chunk-major (see Tile) and turn
 * positions into buffer offsets. The offset and chunk of every position k are tabulated first: K
 * divisions instead of several per nonzero (this took 2 % of a 90 %-sparse 64-channel layer,
 * serial before the threads start). The tables and the checked copies of the indices share one
 * scratch allocation, freed before the workers start. */
static ScStatus prepare_entries(const ConvArgs *a, Job *job, int forced_chunk, char *msg, size_t cap)
{
    const int taps = a->kh * a->kw, n_groups = a->n_groups, G = a->group;
    const int chunk = chunk_channels(a, forced_chunk);
    const int n_chunks = (a->c_in + chunk - 1) / chunk;
    const int n_k = a->c_in * taps;
    const size_t nnz = a->nz_k.len;
    const size_t n_segs = (size_t)n_chunks * n_groups;
    int32_t *seg_ptr = calloc(n_segs + 1, sizeof(int32_t));
    int32_t *off = malloc((nnz ? nnz : 1) * sizeof(int32_t));
    float *val = malloc((nnz ? nnz : 1) * G * sizeof(float));
    /* scratch: k_off, k_seg [n_k] (k_seg: first segment of k's chunk), gp [n_groups + 1], ks [nnz] */
    int32_t *k_off = malloc((2 * (size_t)n_k + n_groups + 1 + nnz) * sizeof(int32_t));
    if (!seg_ptr || !off || !val || !k_off) {
        free(seg_ptr);
        free(off);
        free(val);
        free(k_off);
        return SC_NO_MEMORY;
    }
    int32_t *k_seg = k_off + n_k, *gp = k_seg + n_k, *ks = gp + n_groups + 1;
    const ScStatus status = copy_indices(a, gp, ks, msg, cap);
    if (status != SC_OK) {
        free(seg_ptr);
        free(off);
        free(val);
        free(k_off);
        return status;
    }
    for (int k = 0; k < n_k; k++) {
        const int c = k / taps, ky = (k % taps) / a->kw, kx = k % a->kw;
        k_off[k] = (int32_t)(c * job->cs + (size_t)ky * job->wp + kx);
        k_seg[k] = (c / chunk) * n_groups;
    }
    for (int g = 0; g < n_groups; g++) /* count the entries of every (chunk, group) segment */
        for (int32_t i = gp[g]; i < gp[g + 1]; i++)
            seg_ptr[(size_t)k_seg[ks[i]] + g + 1]++;
    for (size_t s = 0; s < n_segs; s++)
        seg_ptr[s + 1] += seg_ptr[s];
    for (int g = 0; g < n_groups; g++) {
        /* entries of a group usually ascend in k, hence in chunk; any order fills its segments
         * exactly, as they were counted above */
        for (int32_t i = gp[g]; i < gp[g + 1]; i++) {
            const int k = ks[i];
            const int32_t j = seg_ptr[(size_t)k_seg[k] + g]++; /* for now the segment's fill position */
            off[j] = k_off[k];
            for (int m = 0; m < G; m++)
                val[(size_t)j * G + m] = a->nz_val.p[(size_t)i * G + m];
        }
    }
    for (size_t s = n_segs; s > 0; s--) /* undo the fill positions: back to segment starts */
        seg_ptr[s] = seg_ptr[s - 1];
    seg_ptr[0] = 0;
    free(k_off);
    job->n_chunks = n_chunks;
    job->seg_ptr = seg_ptr;
    job->off = off;
    job->val = val;
    return SC_OK;
}

ScStatus run_conv(ConvArgs *a, const RunOptions *o, char *msg, size_t cap)
{
    ScStatus status = check_args(a, o, msg, cap);
    if (status != SC_OK)
        return status;
    int threads = o->threads > 0 ? o->threads : 1;
    int band_rows = o->band_rows > a->h ? a->h : o->band_rows;
    int band_cols = o->band_cols > a->w ? a->w : o->band_cols;
    choose_tile(a, threads, &band_rows, &band_cols);

    Job job;
    memset(&job, 0, sizeof job);
    job.a = a;
    job.fn = tile_function(o->isa);
    job.band_rows = band_rows;
    job.band_cols = band_cols;
    job.n_bands = (a->h + band_rows - 1) / band_rows;
    job.n_colblocks = (a->w + band_cols - 1) / band_cols;
    job.n_tiles = (long long)a->n * job.n_bands * job.n_colblocks;
    job.wp = band_cols + a->kw - 1;
    /* channel stride: room for partial-vector overrun, and an odd number of cache lines so
     * that the same pixel of different channels does not map to the same L1 set */
    size_t cs = (size_t)(band_rows + a->kh - 1) * job.wp + MAX_VW;
    cs = (cs + 15) / 16 * 16;
    if ((cs / 16) % 2 == 0)
        cs += 16;
    job.cs = cs;
    if ((double)cs * a->c_in + MAX_VW >= 2147483647.0) {
        snprintf(msg, cap, "the input window of a tile (%d channels x %zu floats) exceeds int32 offsets",
                 a->c_in, cs);
        return SC_TOO_LARGE;
    }

    status = prepare_entries(a, &job, o->chunk, msg, cap);
    if (status != SC_OK)
        return status;

    if (threads > job.n_tiles)
        threads = (int)job.n_tiles;
    run_workers(&job, threads, o->own_threads);
    free((void *)job.seg_ptr);
    free((void *)job.off);
    free((void *)job.val);
    return atomic_load(&job.failed) ? SC_NO_MEMORY : SC_OK;
}
