/* Compute one tile of the direct sparse convolution for one instruction set.
 *
 * Included once per ISA by tile_kernels.c after defining:
 *   VEC, VW (floats per vector), NV1 / NV4 (max vectors per register tile for groups of 1 / 4
 *   output channels), KTARGET (function attribute), FN(name) (name with ISA suffix) and the
 *   V_* operations used below.
 *
 * Output-stationary: a register tile holds nv vectors of consecutive output pixels of one row
 * for G output channels; every nonzero of the group adds weight * (input at pixel + offset).
 * The input comes from the tile's zero-padded buffer, so there are no bounds checks inside.
 *
 * Input channels are processed in chunks small enough that the chunk's input under one
 * register tile stays in L1 while all output channels use it; between chunks the partial sums
 * of a register tile wait in `t->stage` (also L1). The last chunk applies the epilogue.
 */

/* Partial vector (only for images narrower than a register tile): go through the stack so
 * that nothing outside the output or residual is touched. Out of line: its stack arrays
 * would otherwise be set up on every call of the hot path. */
static KTARGET __attribute__((noinline)) void FN(finish_partial)(const ConvArgs *a, VEC v, float *dst,
                                                                 const float *res, int valid)
{
    float lanes[VW];
    if (res) {
        memcpy(lanes, res, (size_t)valid * sizeof(float));
        memset(lanes + valid, 0, (size_t)(VW - valid) * sizeof(float));
        v = V_FMA(V_SET1(a->res_scale), v, V_LOADU(lanes));
    }
    V_STOREU(lanes, v);
    memcpy(dst, lanes, (size_t)valid * sizeof(float));
}

/* acc -> (+ bias) -> (relu) -> (residual + res_scale * y) -> store `valid` lanes. */
static KTARGET ALWAYS_INLINE void FN(finish)(const ConvArgs *a, VEC v, float bias, float *dst,
                                            const float *res, int valid)
{
    if (a->bias)
        v = V_ADD(v, V_SET1(bias));
    if (a->relu)
        v = V_MAX(v, V_ZERO());
    if (valid == VW) {
        if (res)
            v = V_FMA(V_SET1(a->res_scale), v, V_LOADU(res));
        /* Streaming stores skip the read-for-ownership of output lines that are far from any
         * cache anyway: a tile writes to every output channel's plane, too many streams for
         * the hardware prefetcher. */
        if (a->stream && ((uintptr_t)dst & (VW * sizeof(float) - 1)) == 0)
            V_STREAM(dst, v);
        else
            V_STOREU(dst, v);
        return;
    }
    FN(finish_partial)(a, v, dst, res, valid);
}

/* Store vector v of output channel oc's register tile: through the epilogue to the output
 * after the last chunk, else into the stage. Takes the vector by value so that the
 * accumulators never need an address (which would keep them on the stack). */
static KTARGET ALWAYS_INLINE void FN(store)(const Tile *t, VEC acc, int oc, float *stage,
                                           size_t pix, int v, int valid, int last)
{
    if (!last) {
        V_STOREU(stage + v * VW, acc);
        return;
    }
    const ConvArgs *a = t->a;
    if (oc >= a->c_out)
        return; /* padding channel of the last group */
    const size_t at = ((size_t)t->img * a->c_out + oc) * ((size_t)a->h * a->w) + pix + v * VW;
    const int lanes = valid - v * VW < VW ? valid - v * VW : VW;
    FN(finish)(a, acc, a->bias ? a->bias[oc] : 0.0f, a->out + at, a->residual ? a->residual + at : NULL,
               lanes);
}

/* Unstructured: one output channel g, nonzeros [begin, end) of the current chunk. */
static KTARGET ALWAYS_INLINE void FN(tile_g1)(const Tile *t, const float *in, int g, int begin,
                                             int end, float *stage, size_t pix, int nv, int valid,
                                             int first, int last)
{
    const int32_t *off = t->off;
    const float *val = t->val;
    VEC acc[NV1];
    /* unrolled before GCC's loop distribution could turn the zeroing into a memset call */
#pragma GCC unroll 8
    for (int v = 0; v < nv; v++)
        acc[v] = first ? V_ZERO() : V_LOADU(stage + v * VW);
    for (int i = begin; i < end; i++) {
        const float *p = in + off[i];
        VEC w = V_SET1(val[i]);
        for (int v = 0; v < nv; v++)
            acc[v] = V_FMA(w, V_LOADU(p + v * VW), acc[v]);
    }
    for (int v = 0; v < nv; v++)
        FN(store)(t, acc[v], g, stage, pix, v, valid, last);
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
    for (int v = 0; v < nv; v++) {
        FN(store)(t, acc0[v], 4 * g, stage, pix, v, valid, last);
        FN(store)(t, acc1[v], 4 * g + 1, stage + s, pix, v, valid, last);
        FN(store)(t, acc2[v], 4 * g + 2, stage + 2 * s, pix, v, valid, last);
        FN(store)(t, acc3[v], 4 * g + 3, stage + 3 * s, pix, v, valid, last);
    }
}

/* Instantiate the register tiles for every compile-time width 1..NV so the accumulators live
 * in registers (a run-time nv would force them to memory). */
#define TILE_ARGS t, in, g, begin, end, stage, pix
#define TILE_FLAGS valid, first, last
static KTARGET void FN(run_g1)(const Tile *t, const float *in, int g, int begin, int end,
                              float *stage, size_t pix, int nv, int valid, int first, int last)
{
    switch (nv) {
    case 4: FN(tile_g1)(TILE_ARGS, 4, TILE_FLAGS); break;
    case 3: FN(tile_g1)(TILE_ARGS, 3, TILE_FLAGS); break;
    case 2: FN(tile_g1)(TILE_ARGS, 2, TILE_FLAGS); break;
    default: FN(tile_g1)(TILE_ARGS, 1, TILE_FLAGS); break;
    }
}

static KTARGET void FN(run_g4)(const Tile *t, const float *in, int g, int begin, int end,
                              float *stage, size_t pix, int nv, int valid, int first, int last)
{
    switch (nv) {
#if NV4 >= 4
    case 4: FN(tile_g4)(TILE_ARGS, 4, TILE_FLAGS); break;
#endif
#if NV4 >= 3
    case 3: FN(tile_g4)(TILE_ARGS, 3, TILE_FLAGS); break;
#endif
    case 2: FN(tile_g4)(TILE_ARGS, 2, TILE_FLAGS); break;
    default: FN(tile_g4)(TILE_ARGS, 1, TILE_FLAGS); break;
    }
}
#undef TILE_ARGS
#undef TILE_FLAGS

KTARGET void FN(tile)(const Tile *t)
{
    const ConvArgs *a = t->a;
    const int g4 = a->group == 4;
    const int nv_max = g4 ? NV4 : NV1;
    const int full = nv_max * VW;
    const int stage_per_group = a->group * full;
    for (int r = 0; r < t->rows; r++) {
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
            const int32_t *seg = t->seg_ptr;
            for (int chunk = 0; chunk < t->n_chunks; chunk++) {
                const int first = chunk == 0, last = chunk == t->n_chunks - 1;
                for (int g = 0; g < a->n_groups; g++, seg++) {
                    float *stage = t->stage + (size_t)g * stage_per_group;
                    if (g4)
                        FN(run_g4)(t, in, g, seg[0], seg[1], stage, pix, nv, valid, first, last);
                    else
                        FN(run_g1)(t, in, g, seg[0], seg[1], stage, pix, nv, valid, first, last);
                }
            }
        }
    }
    V_FENCE(); /* order the streaming stores before the tile is reported done */
}
