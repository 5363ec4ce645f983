/* Shared by the C helpers: bf16 <-> fp32, the AVX2 clone attribute, fp32 dot products and the
 * row-range runner (parallel.c). */
#ifndef V4C_NATIVE_COMMON_H
#define V4C_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

/* x86-64 Linux: the row kernels also get an AVX2 build, picked at load time by the CPU's features
 * (the library stays runnable on any x86-64 CPU). The clone is named by feature, not "arch=haswell":
 * an arch clone is dispatched on the CPU model, so AMD CPUs with AVX2 were given the SSE2 build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define V4C_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define V4C_CLONES
#endif

#define V4C_UNUSED __attribute__((unused)) /* the helpers below: not every file calls each */

/* How far ahead a product that reads each weight once prefetches its weight streams, non-temporal
 * (dots_template.h, quant.c's MXFP4 rows): 512 and 1,024 bytes measured best of 512-4,096. */
#define V4C_PF_BYTES 512

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded); /* a select: vectorises */
}

/* IEEE binary16 <-> fp32 in plain C (any x86-64: F16C is not assumed), round to nearest even;
 * subnormals, infinities and NaNs (kept quiet) as PyTorch's conversions give them */
static inline float h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0x1fu) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) { /* zero or subnormal: m units of 2^-24, exact in fp32 */
        const float v = (float)m * 5.9604644775390625e-8f;
        memcpy(&u, &v, 4);
        u |= sign;
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2h(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x47800000u) /* 65536 and up, infinity, NaN */
        return (uint16_t)(sign | (a > 0x7f800000u ? 0x7e00u | ((a >> 13) & 0x3ffu) : 0x7c00u));
    if (a < 0x38800000u) { /* below 2^-14: adding 0.5 (whose ulp is 2^-24, the subnormal unit) rounds it */
        float v;
        memcpy(&v, &a, 4);
        v += 0.5f;
        uint32_t b;
        memcpy(&b, &v, 4);
        return (uint16_t)(sign | (b - 0x3f000000u));
    }
    a += 0xc8000fffu + ((a >> 13) & 1u); /* exponent rebiased (-112), then round the 13 bits dropped */
    return (uint16_t)(sign | (a >> 13)); /* (a carry into the exponent past 30 gives infinity: right) */
}

/* dtype codes of the C helpers: 0 float32, 1 bfloat16, 2 float16 (2-byte codes store their bits) */
static inline float half_to_f(uint16_t h, int dt) { return dt == 2 ? h2f(h) : bf2f(h); }
static inline uint16_t f_to_half(float f, int dt) { return dt == 2 ? f2h(f) : f2bf(f); }

/* v as stored in dtype dt (three plain cases: a loop over them is unswitched per dtype, bf16's vectorised) */
static inline float round_to(float v, int dt) { return dt == 1 ? bf2f(f2bf(v)) : dt == 2 ? h2f(f2h(v)) : v; }

/* n values of dtype dt at p, as fp32 */
V4C_CLONES V4C_UNUSED static void widen(const void *p, int dt, long n, float *out) {
    const uint16_t *h = (const uint16_t *)p;
    if (dt == 1) {
        for (long i = 0; i < n; i++) out[i] = bf2f(h[i]);
    } else if (dt == 2) {
        for (long i = 0; i < n; i++) out[i] = h2f(h[i]);
    } else {
        memcpy(out, p, n * sizeof(float));
    }
}

/* store in dtype dt; `v` is updated to the values as stored (the rounding later ops see) */
V4C_CLONES V4C_UNUSED static void store(void *p, int dt, float *v, long n) {
    uint16_t *h = (uint16_t *)p;
    if (dt == 1) {
        for (long i = 0; i < n; i++) {
            h[i] = f2bf(v[i]);
            v[i] = bf2f(h[i]);
        }
    } else if (dt == 2) {
        for (long i = 0; i < n; i++) {
            h[i] = f2h(v[i]);
            v[i] = h2f(h[i]);
        }
    } else {
        memcpy(p, v, n * sizeof(float));
    }
}

/* n fp32 values stored in dtype dt (out of fp32 sums: the one rounding of a product's output) */
V4C_CLONES V4C_UNUSED static void store_from(void *p, int dt, const float *v, long n) {
    uint16_t *h = (uint16_t *)p;
    if (dt == 1)
        for (long i = 0; i < n; i++) h[i] = f2bf(v[i]);
    else if (dt == 2)
        for (long i = 0; i < n; i++) h[i] = f2h(v[i]);
    else
        memcpy(p, v, n * sizeof(float));
}

V4C_CLONES V4C_UNUSED static float dot(const float *a, const float *b, long n) {
    /* eight independent partial sums: lets the compiler use vector lanes without -ffast-math */
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

/* GCC/clang vector extension: 8 fp32 lanes (two SSE registers in the baseline build, one in AVX2).
 * Loads go through memcpy: no alignment is assumed. */
typedef float v8f __attribute__((vector_size(32)));

#define LD8(v, p) memcpy(&(v), (p), sizeof(v8f)) /* (a macro: no vector-typed function ABI) */
typedef uint32_t v8u __attribute__((vector_size(32))); /* the bits of 8 fp32 lanes */

/* 8 fp32 rounded to bf16 as f2bf() rounds them (to nearest even, NaN kept quiet), as the fp32 bits of the
 * rounded values (each bf16 in its lane's top half) */
#define V8_BF16_BITS(x) __extension__({                                                                   \
        const v8u u_ = (v8u)(x), nan_ = (v8u)((u_ & 0x7fffffffu) > 0x7f800000u);                          \
        ((((u_ + 0x7fffu + ((u_ >> 16) & 1u)) >> 16) << 16) & ~nan_) | (((u_ | 0x400000u) & 0xffff0000u) & nan_); \
    })
#define V8_SEL(m, a, b) ((v8f)(((v8u)(a) & (v8u)(m)) | ((v8u)(b) & ~(v8u)(m)))) /* a where the mask m is set, else b */
#define V8_BF16(x) ((v8f)V8_BF16_BITS(x)) /* x rounded to bf16 lane by lane, as fp32 */
/* x rounded to dtype dt (0: as it is) lane by lane, as fp32; fp16 one lane at a time (f2h) */
#define V8_ROUND(x, dt) __extension__({                                                                   \
        v8f r8_ = (x);                                                                                     \
        if ((dt) == 1)                                                                                     \
            r8_ = V8_BF16(r8_);                                                                            \
        else if ((dt) == 2)                                                                                \
            for (int l_ = 0; l_ < 8; l_++) r8_[l_] = h2f(f2h(r8_[l_]));                                    \
        r8_;                                                                                               \
    })

/* e^x lane by lane, within 1 ulp of libm's expf for -87 <= x <= 88 (measured at 1.8 million points;
 * clamped outside, so the scale 2^n stays a normal number: e^-87 ~ 1.6e-38; NaN stays NaN): a reduction
 * by ln 2 in two parts (the high part exact times n) and a degree-7 polynomial, ~20 vector operations
 * for eight values where expf is a call per value */
#define V8_EXP(x0) __extension__({                                                                      \
        v8f x_ = V8_SEL((x0) < -87.0f, (v8f){0} - 87.0f, (x0));                                         \
        x_ = V8_SEL(x_ > 88.0f, (v8f){0} + 88.0f, x_);                                                   \
        const v8f t_ = x_ * 1.44269504f + 12582912.0f; /* 1.5 * 2^23: round(x / ln 2) in t's low bits */ \
        const v8f n_ = t_ - 12582912.0f;                                                                 \
        const v8f r_ = (x_ - n_ * 0.693145752f) - n_ * 1.42860677e-6f;                                   \
        v8f p_ = r_ * 1.98412698e-4f + 1.38888889e-3f;                                                   \
        p_ = p_ * r_ + 8.33333333e-3f;                                                                   \
        p_ = p_ * r_ + 4.16666667e-2f;                                                                   \
        p_ = p_ * r_ + 1.66666667e-1f;                                                                   \
        p_ = p_ * r_ + 0.5f;                                                                             \
        p_ = p_ * r_ + 1.0f;                                                                             \
        p_ = p_ * r_ + 1.0f;                                                                             \
        p_ * (v8f)(((v8u)t_ - 0x4B400000u + 127u) << 23);                                                \
    })
#define HSUM8(s) ((((s)[0] + (s)[1]) + ((s)[2] + (s)[3])) + (((s)[4] + (s)[5]) + ((s)[6] + (s)[7]))) /* dot()'s order */

#if defined(__clang__)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v8i __attribute__((vector_size(32)));
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* out[r] = HSUM8(s[r]) for eight vectors at once: three rounds of pairwise lane sums, in
 * HSUM8's order (so the same roundings), instead of eight horizontal sums one by one */
#define HSUM8X8(s, out) do {                                                                  \
        v8f p_[4], q_[2], r_;                                                                 \
        for (int i_ = 0; i_ < 4; i_++)                                                        \
            p_[i_] = SHUF8(s[2 * i_], s[2 * i_ + 1], 0, 8, 2, 10, 4, 12, 6, 14)               \
                   + SHUF8(s[2 * i_], s[2 * i_ + 1], 1, 9, 3, 11, 5, 13, 7, 15);              \
        for (int i_ = 0; i_ < 2; i_++)                                                        \
            q_[i_] = SHUF8(p_[2 * i_], p_[2 * i_ + 1], 0, 1, 8, 9, 4, 5, 12, 13)              \
                   + SHUF8(p_[2 * i_], p_[2 * i_ + 1], 2, 3, 10, 11, 6, 7, 14, 15);           \
        r_ = SHUF8(q_[0], q_[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUF8(q_[0], q_[1], 4, 5, 6, 7, 12, 13, 14, 15); \
        memcpy((out), &r_, sizeof r_);                                                        \
    } while (0)

/* m[i] = dot(w + i * n, x, n) for i < M, R rows of w per pass over x: the same lanes, order and
 * roundings as dot() (so bit-identical to it), with R independent sums per load of x. */
#define DOTS_BLOCK(R)                                                                       \
    for (; i + (R) <= M; i += (R)) {                                                        \
        v8f s[R], xv, a;                                                                    \
        for (int r = 0; r < (R); r++) s[r] = (v8f){0};                                      \
        for (long d = 0; d < n8; d += 8) {                                                  \
            LD8(xv, x + d);                                                                 \
            for (int r = 0; r < (R); r++) {                                                 \
                LD8(a, w + (i + r) * n + d);                                                \
                s[r] += a * xv;                                                             \
            }                                                                               \
        }                                                                                   \
        float t[R];                                                                         \
        if ((R) == 8)                                                                       \
            HSUM8X8(s, t);                                                                  \
        else                                                                                \
            for (int r = 0; r < (R); r++) t[r] = HSUM8(s[r]);                               \
        for (int r = 0; r < (R); r++) {                                                     \
            for (long d = n8; d < n; d++) t[r] += w[(i + r) * n + d] * x[d];                \
            m[i + r] = t[r];                                                                \
        }                                                                                   \
    }

V4C_CLONES V4C_UNUSED static void dots(const float *w, const float *x, long n, int M, float *m) {
    const long n8 = n & ~7L;
    int i = 0;
    DOTS_BLOCK(8)
    DOTS_BLOCK(4)
    for (; i < M; i++) m[i] = dot(w + i * n, x, n);
}

/* fn(ctx, r0, r1, tid) over [0, rows) split into at most `threads` ranges of at least `grain` rows,
 * run by PyTorch's OpenMP team when there is one (parallel.c); tid < threads indexes scratch */
typedef void (*v4c_rows_fn)(void *ctx, long r0, long r1, int tid);
void v4c_parallel_rows(long rows, int threads, long grain, v4c_rows_fn fn, void *ctx);

#endif
