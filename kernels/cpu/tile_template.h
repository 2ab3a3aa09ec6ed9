/* Compute one tile of the direct sparse convolution for one instruction set.
 *
 * Included once per ISA by tile_kernels.c after defining:
 *   VEC, VW (floats per vector), NR1 (1..3: max rows of a register tile for groups of 1 output
 *   channel), NV1 / NV4 (4 / 1..4: max vectors per row for groups of 1 / 4 output channels),
 *   KTARGET (function attribute), FN(name) (name with ISA suffix) and the V_* operations below.
 *
 * Output-stationary: a register tile holds nv vectors of consecutive output pixels of nr rows
 * (nr = 1 for blocks) for G output channels; every nonzero of the group adds
 * weight * (input at pixel + offset). The input comes from the tile's zero-padded buffer, so
 * there are no bounds checks inside.
 *
 * Input channels are processed in chunks small enough that the chunk's input under one
 * register tile stays in L1 while all output channels use it; between chunks the partial sums
 * of a register tile wait in `t->stage` (also L1). The last chunk applies the epilogue.
 */

_Static_assert(NR1 >= 1 && NR1 <= 3 && NV1 == 4 && NV4 >= 1 && NV4 <= 4, "run_g1 / run_g4 cover these");
_Static_assert(NR1 * NV1 * VW <= STAGE_PER_GROUP && 4 * NV4 * VW <= STAGE_PER_GROUP, "stage size");

/* Partial vector (only for images narrower than a register tile): go through the stack so
 * that nothing outside the output or residual is touched. Out of line: its stack arrays
 * would otherwise be set up on every call of the hot path. */
static KTARGET __attribute__((noinline)) void FN(finish_partial)(VEC v, const float *res, VEC scale,
                                                                 float *dst, int lanes)
{
    float tmp[VW];
    if (res) {
        memcpy(tmp, res, (size_t)lanes * sizeof(float));
        memset(tmp + lanes, 0, (size_t)(VW - lanes) * sizeof(float));
        v = V_FMA(scale, v, V_LOADU(tmp));
    }
    V_STOREU(tmp, v);
    memcpy(dst, tmp, (size_t)lanes * sizeof(float));
}

/* The epilogue of one output channel of a register tile, set up once per channel so that the
 * per-vector work is a few instructions (per-vector checks had cost 4 % of a 90 %-sparse
 * 128² layer, 8-14 % at 98 %).
 * Plain values, no pointers to them: they stay in registers next to the accumulators. */
typedef struct {
    float *out;        /* output at the register tile's first pixel */
    const float *res;  /* residual there, or NULL */
    VEC bias, scale;   /* bias (0 without one), res_scale */
    VEC slope;         /* negative-side slope (LeakyReLU / PReLU), used when leaky */
    int relu, leaky, stream;
    size_t row, step;  /* output floats between register-tile rows / between neighbouring pixels */
} FN(Epilogue);

static KTARGET ALWAYS_INLINE FN(Epilogue) FN(epilogue)(const Tile *t, int oc, size_t pix)
{
    const ConvArgs *a = t->a;
    const size_t plane = (size_t)a->h * a->w;
    size_t at = ((size_t)t->img * a->c_out + oc) * plane + pix, row = (size_t)a->w, step = 1;
    if (a->shuffle > 1) {
        /* pixel shuffle: channel oc = (c * s + i) * s + j, pixel (y, x) -> out[c][y*s + i][x*s + j]
         * (no residual, no streaming stores: checked by the binding) */
        const size_t sh = (size_t)a->shuffle, c = (size_t)oc / (sh * sh), i = (size_t)oc / sh % sh,
                     j = (size_t)oc % sh, y = pix / a->w, x = pix % a->w;
        at = (size_t)t->img * a->c_out * plane + c * sh * sh * plane + (y * sh + i) * sh * a->w + x * sh + j;
        row = sh * sh * a->w;
        step = sh;
    }
    FN(Epilogue) e = {
        .out = a->out.p + at, .res = a->residual.p ? a->residual.p + at : NULL, .row = row, .step = step,
        .bias = V_SET1(a->bias.p ? a->bias.p[oc] : 0.0f), .scale = V_SET1(a->res_scale), .relu = a->relu,
        .leaky = a->slope.p != NULL, .slope = V_SET1(a->slope.p ? a->slope.p[a->slope.len > 1 ? oc : 0] : 0.0f),
        /* Streaming stores skip the read-for-ownership of output lines that are far from any
         * cache anyway: a tile writes to every output channel's plane, too many streams for
         * the hardware prefetcher. They need aligned vectors: all of them are when the first
         * one is and rows are whole vectors. */
        .stream = a->stream && ((uintptr_t)(a->out.p + at) & (VW * sizeof(float) - 1)) == 0 && a->w % VW == 0,
    };
    return e;
}

/* Lanes of a pixel-shuffled output go `step` floats apart. */
static KTARGET ALWAYS_INLINE void FN(finish_strided)(VEC v, float *dst, size_t step, int lanes)
{
    float tmp[VW];
    V_STOREU(tmp, v);
    if (lanes == VW) {
#pragma GCC unroll 16
        for (int k = 0; k < VW; k++)
            dst[k * step] = tmp[k];
        return;
    }
    for (int k = 0; k < lanes; k++)
        dst[k * step] = tmp[k];
}

/* acc -> + bias -> (relu, or max(y, 0) + slope * min(y, 0)) -> (residual + res_scale * y) ->
 * store the first `lanes` lanes at offset `at` (rows * e->row + pixels * e->step) of the epilogue's channel. */
static KTARGET ALWAYS_INLINE void FN(finish)(const FN(Epilogue) *e, VEC v, size_t at, int lanes)
{
    v = V_ADD(v, e->bias);
    if (e->relu)
        v = V_MAX(v, V_ZERO());
    else if (e->leaky)
        v = V_FMA(e->slope, V_MIN(v, V_ZERO()), V_MAX(v, V_ZERO()));
    if (e->step != 1) {
        FN(finish_strided)(v, e->out + at, e->step, lanes);
        return;
    }
    if (lanes < VW) {
        FN(finish_partial)(v, e->res ? e->res + at : NULL, e->scale, e->out + at, lanes);
        return;
    }
    if (e->res)
        v = V_FMA(e->scale, v, V_LOADU(e->res + at));
    if (e->stream)
        V_STREAM(e->out + at, v);
    else
        V_STOREU(e->out + at, v);
}

/* Lanes of vector v in a row of `valid` pixels. */
#define LANES(v, valid) ((valid) - (v) * VW < VW ? (valid) - (v) * VW : VW)

/* Unstructured: one output channel g, nonzeros [begin, end) of the current chunk, on a register
 * tile of nr rows x nv vectors. Each nonzero's offset and broadcast weight feed nr * nv FMAs,
 * and the weights of the layer stream through L1 once per nr * nv vectors of output. */
static KTARGET ALWAYS_INLINE void FN(tile_g1)(const Tile *t, const float *in, int g, int begin,
                                             int end, float *stage, size_t pix, int nr, int nv,
                                             int valid, int first, int last)
{
    const int32_t *off = t->off;
    const float *val = t->val;
    const size_t wp = (size_t)t->wp;
    VEC acc[NR1][NV1];
    /* unrolled before GCC's loop distribution could turn the zeroing into a memset call */
#pragma GCC unroll 16
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++)
            acc[r][v] = first ? V_ZERO() : V_LOADU(stage + (r * NV1 + v) * VW);
    for (int i = begin; i < end; i++) {
        const float *p = in + off[i];
        VEC wt = V_SET1(val[i]);
#pragma GCC unroll 16
        for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++)
                acc[r][v] = V_FMA(wt, V_LOADU(p + r * wp + v * VW), acc[r][v]);
    }
    if (!last) { /* partial sums wait for the next chunk */
#pragma GCC unroll 16
        for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++)
                V_STOREU(stage + (r * NV1 + v) * VW, acc[r][v]);
        return;
    }
    const FN(Epilogue) e = FN(epilogue)(t, g, pix);
#pragma GCC unroll 16
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++)
            FN(finish)(&e, acc[r][v], r * e.row + v * VW * e.step, LANES(v, valid));
}

/* The epilogue of one output channel's register tile (one row of nv vectors). */
static KTARGET ALWAYS_INLINE void FN(finish_channel)(const Tile *t, const VEC *acc, int oc, size_t pix, int nv,
                                                    int valid)
{
    FN(Epilogue) e = FN(epilogue)(t, oc, pix);
#pragma GCC unroll 8
    for (int v = 0; v < nv; v++)
        FN(finish)(&e, acc[v], v * VW * e.step, LANES(v, valid));
}

/* Blocks: 4 output channels sharing nonzero positions; each input load feeds 4 accumulators. */
static KTARGET ALWAYS_INLINE void FN(tile_g4)(const Tile *t, const float *in, int g, int begin,
                                             int end, float *stage, size_t pix, int nv, int valid,
                                             int first, int last)
{
    const int32_t *off = t->off;
    const float *val = t->val;
    const int s = NV4 * VW; /* stage stride between the 4 channels */
    VEC acc0[NV4], acc1[NV4], acc2[NV4], acc3[NV4];
#pragma GCC unroll 8
    for (int v = 0; v < nv; v++) {
        acc0[v] = first ? V_ZERO() : V_LOADU(stage + v * VW);
        acc1[v] = first ? V_ZERO() : V_LOADU(stage + s + v * VW);
        acc2[v] = first ? V_ZERO() : V_LOADU(stage + 2 * s + v * VW);
        acc3[v] = first ? V_ZERO() : V_LOADU(stage + 3 * s + v * VW);
    }
    for (int i = begin; i < end; i++) {
        const float *p = in + off[i];
        const float *w = val + 4 * (size_t)i;
        VEC x[NV4];
        for (int v = 0; v < nv; v++)
            x[v] = V_LOADU(p + v * VW);
        VEC w0 = V_SET1(w[0]);
        for (int v = 0; v < nv; v++)
            acc0[v] = V_FMA(w0, x[v], acc0[v]);
        VEC w1 = V_SET1(w[1]);
        for (int v = 0; v < nv; v++)
            acc1[v] = V_FMA(w1, x[v], acc1[v]);
        VEC w2 = V_SET1(w[2]);
        for (int v = 0; v < nv; v++)
            acc2[v] = V_FMA(w2, x[v], acc2[v]);
        VEC w3 = V_SET1(w[3]);
        for (int v = 0; v < nv; v++)
            acc3[v] = V_FMA(w3, x[v], acc3[v]);
    }
    if (!last) { /* partial sums wait for the next chunk */
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) {
            V_STOREU(stage + v * VW, acc0[v]);
            V_STOREU(stage + s + v * VW, acc1[v]);
            V_STOREU(stage + 2 * s + v * VW, acc2[v]);
            V_STOREU(stage + 3 * s + v * VW, acc3[v]);
        }
        return;
    }
    /* channels past c_out (padding of the last group) are computed and never stored */
    const int c_out = t->a->c_out, oc = 4 * g;
    FN(finish_channel)(t, acc0, oc, pix, nv, valid);
    if (oc + 1 < c_out)
        FN(finish_channel)(t, acc1, oc + 1, pix, nv, valid);
    if (oc + 2 < c_out)
        FN(finish_channel)(t, acc2, oc + 2, pix, nv, valid);
    if (oc + 3 < c_out)
        FN(finish_channel)(t, acc3, oc + 3, pix, nv, valid);
}

/* Partial sums of one group's register tile in the stage. */
#define STAGE_G1 (NR1 * NV1 * VW)
#define STAGE_G4 (4 * NV4 * VW)

/* One register-tile position (a run of pixels of nr rows) for every group, over the nonzeros
 * of one input-channel chunk (segments seg[g]..seg[g + 1]). The group loop sits inside each
 * compile-time instantiation (every width 1..NV, every row count 1..NR1, so the accumulators
 * live in registers; a run-time nv would force them to memory). One call per position instead
 * of one per group: 2 % faster at 90 % sparsity, 5-9 % at 95-98 %. */
#define TILE_FLAGS valid, first, last
static KTARGET HOT_ALIGN void FN(run_g1)(const Tile *t, const float *in, const int32_t *seg, size_t pix,
                              int nr, int nv, int valid, int first, int last)
{
    const int n_groups = t->a->n_groups;
#define G1(nr_, nv_) \
    for (int g = 0; g < n_groups; g++) \
        FN(tile_g1)(t, in, g, seg[g], seg[g + 1], t->stage + (size_t)g * STAGE_G1, pix, nr_, nv_, \
                    TILE_FLAGS); \
    return
#define G1_ROWS(nr_) \
    switch (nv) { \
    case 4: G1(nr_, 4); \
    case 3: G1(nr_, 3); \
    case 2: G1(nr_, 2); \
    default: G1(nr_, 1); \
    }
#if NR1 >= 3
    if (nr == 3)
        G1_ROWS(3)
#endif
#if NR1 >= 2
    if (nr == 2)
        G1_ROWS(2)
#endif
    G1_ROWS(1)
#undef G1_ROWS
#undef G1
}

static KTARGET HOT_ALIGN void FN(run_g4)(const Tile *t, const float *in, const int32_t *seg, size_t pix,
                              int nv, int valid, int first, int last)
{
    const int n_groups = t->a->n_groups;
#define G4(nv_) \
    for (int g = 0; g < n_groups; g++) \
        FN(tile_g4)(t, in, g, seg[g], seg[g + 1], t->stage + (size_t)g * STAGE_G4, pix, nv_, \
                    TILE_FLAGS); \
    return
    switch (nv) {
#if NV4 >= 4
    case 4: G4(4);
#endif
#if NV4 >= 3
    case 3: G4(3);
#endif
    case 2: G4(2);
    default: G4(1);
    }
#undef G4
}
#undef TILE_FLAGS

KTARGET void FN(tile)(const Tile *t)
{
    const ConvArgs *a = t->a;
    const int g4 = a->group == 4;
    const int nv_max = g4 ? NV4 : NV1;
    const int full = nv_max * VW;
    const int nr_max = g4 ? 1 : NR1;
    for (int r = 0; r < t->rows; r += nr_max) {
        /* G = 1 tiles cover up to NR1 rows; the last rows of the band may be fewer */
        const int nr = g4 ? 1 : (t->rows - r < NR1 ? t->rows - r : NR1);
        const size_t row_pix = (size_t)(t->y0 + r) * a->w + t->x0;
        for (int xl = 0; xl < t->cols; xl += full) {
            int nv = nv_max, start = xl, valid = full;
            if (t->cols - xl < full) {
                /* Last register tile of the row: use fewer vectors, and if the row allows,
                 * shift it left to end exactly at the row end (recomputing a few pixels)
                 * instead of storing a partial vector. */
                nv = (t->cols - xl + VW - 1) / VW;
                valid = t->cols - xl;
                if (t->cols >= nv * VW) {
                    start = t->cols - nv * VW;
                    valid = nv * VW;
                }
            }
            const float *in = t->buf + (size_t)r * t->wp + start;
            const size_t pix = row_pix + start;
            for (int chunk = 0; chunk < t->n_chunks; chunk++) {
                const int first = chunk == 0, last = chunk == t->n_chunks - 1;
                const int32_t *seg = t->seg_ptr + (size_t)chunk * a->n_groups;
                if (g4)
                    FN(run_g4)(t, in, seg, pix, nv, valid, first, last);
                else
                    FN(run_g1)(t, in, seg, pix, nr, nv, valid, first, last);
            }
        }
    }
    V_FENCE(); /* order the streaming stores before the tile is reported done */
}
#undef STAGE_G1
#undef STAGE_G4
#undef LANES
