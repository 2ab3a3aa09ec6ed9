/* Shared declarations of the CPU direct sparse convolution (see docs/cpu-kernel.md).
 *
 * The weight of a conv layer arrives as "groups": G consecutive output channels (G = 1 for
 * unstructured CSR, G = 4 for 4x1 / 8x1 BSR blocks) that share one list of nonzero positions
 * k = (c_in * kh + ky) * kw + kx, with G values per position.
 */
#ifndef SPARSECONV_H
#define SPARSECONV_H

#include <stddef.h>
#include <stdint.h>

/* Every array arrives with its length in elements, so that run_conv can check it against the
 * sizes before anything is read or written through it. p may be NULL only when len is 0. */
typedef struct {
    const float *p;
    size_t len;
} FloatArray;

typedef struct {
    float *p;
    size_t len;
} OutArray;

typedef struct {
    const int32_t *p;
    size_t len;
} IndexArray;

typedef struct {
    /* activations: x [n, c_in, h, w], out / residual [n, c_out, h, w], all float32 contiguous */
    FloatArray x;
    OutArray out;
    FloatArray residual;     /* len 0: none */
    FloatArray bias;         /* [c_out], or len 0: none */
    /* negative-side slope of a LeakyReLU (len 1) or PReLU (len c_out) after the bias, or len 0:
     * none; y = max(y, 0) + slope * min(y, 0). Not with relu (which is exactly max(y, 0)). */
    FloatArray slope;
    int n, c_in, h, w, c_out, kh, kw;
    int relu;
    int stream;              /* streaming (non-temporal) stores for the output; < 0: decide */
    int shuffle;             /* s > 1: write out pixel-shuffled, [n, c_out / s^2, h * s, w * s] */
    float res_scale;
    /* weights */
    int group;               /* G: output channels per group (1 or 4) */
    int n_groups;            /* ceil(c_out / G), set by run_conv */
    IndexArray group_ptr;    /* [n_groups + 1] */
    IndexArray nz_k;         /* [nnz] position of each group nonzero, ascending in a group */
    FloatArray nz_val;       /* [nnz * G] the G values of each position */
} ConvArgs;

/* How to run it (none of these change the result). */
typedef struct {
    int isa;                 /* ISA_* code, one of isa_mask() */
    int threads;             /* workers, the calling thread included */
    int band_rows, band_cols; /* tile size, <= 0: automatic */
    int chunk;               /* input channels per L1 chunk, <= 0: automatic */
    int own_threads;         /* start POSIX threads even where an OpenMP team is loaded */
} RunOptions;

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_COUNT = 3 };

/* What run_conv found; all but SC_NO_MEMORY mean the arguments were rejected before the output
 * was touched, with the reason in the message buffer. */
typedef enum {
    SC_OK = 0,
    SC_BAD_SIZE,     /* a size out of range, or sizes inconsistent with each other */
    SC_BAD_LENGTH,   /* an array's length does not match the sizes */
    SC_BAD_POINTER,  /* a NULL or misaligned array, or the output overlapping an input */
    SC_BAD_WEIGHTS,  /* group pointers or positions that would index outside their arrays */
    SC_BAD_ISA,      /* an ISA this CPU cannot run */
    SC_TOO_LARGE,    /* a window or weight too large for the kernel's 32-bit offsets */
    SC_NO_MEMORY,
} ScStatus;

/* Bit i set: ISA i runs on this CPU (detected once, by sparseconv_init) / is in this build. */
unsigned isa_mask(void);
unsigned isa_compiled(void);
void sparseconv_init(void);

/* Check everything, then compute. `msg` (cap bytes) receives a one-line reason on failure. */
ScStatus run_conv(ConvArgs *a, const RunOptions *o, char *msg, size_t cap);

/* One tile of work: output rows [y0, y0 + rows) x columns [x0, x0 + cols) of image `img`,
 * computed from `buf`, a zero-padded copy of the input window it needs. */
typedef struct {
    const ConvArgs *a;
    const float *buf;       /* c_in planes of `cs` floats, each (rows_max + kh - 1) rows of `wp` */
    int wp;                 /* row stride of buf */
    /* the nonzeros, reordered chunk-major: entries of group g whose input channel falls in
     * chunk j are [seg_ptr[j * n_groups + g], seg_ptr[j * n_groups + g + 1]) */
    int n_chunks;
    const int32_t *seg_ptr; /* [n_chunks * n_groups + 1] */
    const int32_t *off;     /* offset of each entry inside buf relative to its output pixel */
    const float *val;       /* [entries * G] */
    float *stage;           /* partial sums between chunks: n_groups * STAGE_PER_GROUP floats */
    int img, y0, x0, rows, cols;
} Tile;

/* Most floats one row of a register tile covers in any ISA (4 vectors of 16), and the partial
 * sums one group's register tile can hold: 4 channels x 1 row, or 1 channel x up to 3 rows. */
#define MAX_TILE 64
#define STAGE_PER_GROUP (4 * MAX_TILE)

/* x86 builds carry AVX2 and AVX-512 code paths, chosen at run time; elsewhere (or with
 * -DSPARSECONV_PORTABLE_ONLY) only the portable one. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(SPARSECONV_PORTABLE_ONLY)
#define SPARSECONV_X86 1
#endif

/* One compute function per instruction set; all compute the same thing. */
void tile_scalar(const Tile *t);
#ifdef SPARSECONV_X86
void tile_avx2(const Tile *t);
void tile_avx512(const Tile *t);
#endif

#endif
