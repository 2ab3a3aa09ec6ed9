/* The tile kernel of tile_template.h, instantiated once per instruction set.
 *
 * One binary serves every x86-64 CPU: the AVX2 and AVX-512 versions are compiled with function
 * target attributes and only called when the CPU check made once at import (sparseconv_init in
 * sparseconv.c) found them supported; run_conv refuses any other ISA code. The portable
 * version uses compiler vector extensions where available (GCC, Clang: SSE2 on x86, NEON on
 * aarch64) and plain floats otherwise.
 */
#include <string.h>

#include "sparseconv.h"

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
/* The hot loops' placement relative to 64-byte lines (Zen's op-cache and fetch windows) used to
 * shift with the size of unrelated code linked before them: +-8 % on an unstructured layer
 * from a change elsewhere. Cache-line aligned entry points make it the same in every build. */
#define HOT_ALIGN __attribute__((aligned(64)))
#else
#define ALWAYS_INLINE inline
#define HOT_ALIGN
#endif

/* ---- portable ---------------------------------------------------------------------------- */
#if defined(__GNUC__)
typedef float vec4_portable __attribute__((vector_size(16)));
typedef int32_t vec4i_portable __attribute__((vector_size(16)));
#define VEC vec4_portable
#define VW 4
static ALWAYS_INLINE VEC portable_load(const float *p)
{
    VEC v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}
static ALWAYS_INLINE VEC portable_set1(float s)
{
    VEC v = {s, s, s, s};
    return v;
}
static ALWAYS_INLINE VEC portable_max(VEC a, VEC b)
{
    vec4i_portable a_wins = a > b; /* lanes of all ones where a > b (C has no vector ?:) */
    return (VEC)(((vec4i_portable)a & a_wins) | ((vec4i_portable)b & ~a_wins));
}
static ALWAYS_INLINE VEC portable_min(VEC a, VEC b)
{
    vec4i_portable a_wins = a < b;
    return (VEC)(((vec4i_portable)a & a_wins) | ((vec4i_portable)b & ~a_wins));
}
#define V_ZERO() portable_set1(0.0f)
#define V_SET1(s) portable_set1(s)
#define V_LOADU(p) portable_load(p)
#define V_STOREU(p, v) memcpy((p), &(v), sizeof(VEC))
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define V_ADD(a, b) ((a) + (b))
#define V_MAX(a, b) portable_max(a, b)
#define V_MIN(a, b) portable_min(a, b)
#define V_STREAM(p, v) V_STOREU(p, v)
#define V_FENCE() ((void)0)
#else
#define VEC float
#define VW 1
#define V_ZERO() 0.0f
#define V_SET1(s) (s)
#define V_LOADU(p) (*(p))
#define V_STOREU(p, v) (*(p) = (v))
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define V_ADD(a, b) ((a) + (b))
#define V_MAX(a, b) ((a) > (b) ? (a) : (b))
#define V_MIN(a, b) ((a) < (b) ? (a) : (b))
#define V_STREAM(p, v) V_STOREU(p, v)
#define V_FENCE() ((void)0)
#endif
#define NR1 2
#define NV1 4
#define NV4 2
#define KTARGET
#define FN(name) name##_scalar
#include "tile_template.h"
#undef VEC
#undef VW
#undef NV1
#undef NR1
#undef NV4
#undef KTARGET
#undef FN
#undef V_ZERO
#undef V_SET1
#undef V_LOADU
#undef V_STOREU
#undef V_FMA
#undef V_ADD
#undef V_MAX
#undef V_MIN
#undef V_STREAM
#undef V_FENCE

#ifdef SPARSECONV_X86
#include <immintrin.h>

/* ---- AVX2 + FMA: 16 ymm registers ---------------------------------------------------------- */
#define VEC __m256
#define VW 8
#define NR1 3 /* 3 rows x 4 accumulators + 1 broadcast weight; inputs are FMA memory operands */
#define NV1 4
#define NV4 2 /* 4 x 2 accumulators + 2 inputs + 1 weight */
#define KTARGET __attribute__((target("avx2,fma")))
#define FN(name) name##_avx2
#define V_ZERO() _mm256_setzero_ps()
#define V_SET1(s) _mm256_set1_ps(s)
#define V_LOADU(p) _mm256_loadu_ps(p)
#define V_STOREU(p, v) _mm256_storeu_ps((p), (v))
#define V_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define V_ADD(a, b) _mm256_add_ps((a), (b))
#define V_MAX(a, b) _mm256_max_ps((a), (b))
#define V_MIN(a, b) _mm256_min_ps((a), (b))
#define V_STREAM(p, v) _mm256_stream_ps((p), (v))
#define V_FENCE() _mm_sfence()
#include "tile_template.h"
#undef VEC
#undef VW
#undef NV1
#undef NR1
#undef NV4
#undef KTARGET
#undef FN
#undef V_ZERO
#undef V_SET1
#undef V_LOADU
#undef V_STOREU
#undef V_FMA
#undef V_ADD
#undef V_MAX
#undef V_MIN
#undef V_STREAM
#undef V_FENCE

/* ---- AVX-512F: 32 zmm registers ------------------------------------------------------------ */
#define VEC __m512
#define VW 16
#define NR1 3
#define NV1 4
#define NV4 4 /* 16 accumulators + 4 inputs + 1 weight */
#define KTARGET __attribute__((target("avx512f")))
#define FN(name) name##_avx512
#define V_ZERO() _mm512_setzero_ps()
#define V_SET1(s) _mm512_set1_ps(s)
#define V_LOADU(p) _mm512_loadu_ps(p)
#define V_STOREU(p, v) _mm512_storeu_ps((p), (v))
#define V_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_ADD(a, b) _mm512_add_ps((a), (b))
#define V_MAX(a, b) _mm512_max_ps((a), (b))
#define V_MIN(a, b) _mm512_min_ps((a), (b))
#define V_STREAM(p, v) _mm512_stream_ps((p), (v))
#define V_FENCE() _mm_sfence()
#include "tile_template.h"
#endif
