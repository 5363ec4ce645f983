/* What the two MoE kernels (moe.c: fp32 / bf16 weights; quant.c: MXFP4 / FP8 weights) share: the
 * scratch carving, the item lookup of their row-range passes and their last pass, the weighted sum. */
#ifndef V4C_NATIVE_MOE_COMMON_H
#define V4C_NATIVE_MOE_COMMON_H

#include <stdint.h>
#include <string.h>

#include "common.h"

static inline long align64(long bytes) { return (bytes + 63) & ~63L; }

static inline void *take(char **p, long bytes) { /* the next 64-byte aligned piece of the scratch */
    void *q = *p;
    *p += align64(bytes);
    return q;
}

static inline long first_item(const long *start, int nitems, long a) { /* the item whose range holds a */
    int lo = 0, hi = nitems - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (start[mid] <= a) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static inline long clampl(long v, long lo, long hi) { return v < lo ? lo : (v > hi ? hi : v); }

#define V8_SEL(m, a, b) ((v8f)(((v8u)(a) & (v8u)(m)) | ((v8u)(b) & ~(v8u)(m)))) /* a where the mask m is set, else b */
#define V8_BF16(x) ((v8f)V8_BF16_BITS(x)) /* x rounded to bf16 lane by lane, as fp32 */

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

/* the clamped SwiGLU of n gate and up values (G, U) as the reference rounds it: for bf16 (dt) each
 * step's result rounded to bf16; activations as fp32 into a32, or as bf16 bits into a16. Eight values
 * a step, the last few through the same vector code (a value's bits do not depend on its place). */
V4C_CLONES V4C_UNUSED static void moe_swiglu(const float *G, const float *U, long n, float lim, int dt, float *a32,
                                            uint16_t *a16) {
    for (long i = 0; i < n; i += 8) {
        const long m = n - i < 8 ? n - i : 8;
        v8f g = {0}, u = {0};
        if (m == 8) { /* (a constant size: one vector load, not a memcpy call) */
            LD8(g, G + i);
            LD8(u, U + i);
        } else {
            memcpy(&g, G + i, m * sizeof(float));
            memcpy(&u, U + i, m * sizeof(float));
        }
        if (dt) {
            g = V8_BF16(g);
            u = V8_BF16(u);
        }
        g = V8_SEL(g > lim, (v8f){0} + lim, g); /* (a NaN stays NaN, as PyTorch's clamp keeps it) */
        u = V8_SEL(u < -lim, (v8f){0} - lim, V8_SEL(u > lim, (v8f){0} + lim, u));
        v8f s = g / (1.0f + V8_EXP(-g)), v;
        if (dt) s = V8_BF16(s);
        v = s * u;
        if (a16) {
            const v8u h = V8_BF16_BITS(v) >> 16;
            for (long k = 0; k < m; k++) a16[i + k] = (uint16_t)h[k];
        } else {
            if (dt) v = V8_BF16(v);
            if (m == 8)
                memcpy(a32 + i, &v, sizeof v);
            else
                memcpy(a32 + i, &v, m * sizeof(float));
        }
    }
}

/* the last pass of both: columns [d0, d1) of every token's weighted sum of its experts' rows of Y
 * ([n + t, D]: one row per assignment, then the shared expert's t rows when `shared`), adding the
 * assignments in their order (perm[lo ..], token = slot / k), so the result does not depend on the
 * thread count; fp32 sums in acc [t, D], written to out as fp32 or rounded once to bf16 (dt) */
static inline void moe_weighted_sum(int t, long D, int shared, long n, long lo, long k, const int64_t *perm,
                                    const float *w, const float *Y, float *acc, int dt, void *out, long d0,
                                    long d1) {
    const long cols = d1 - d0;
    for (int r = 0; r < t; r++) {
        float *o = acc + r * D + d0;
        if (shared)
            memcpy(o, Y + (n + r) * D + d0, cols * sizeof(float));
        else
            memset(o, 0, cols * sizeof(float));
    }
    for (long a = 0; a < n; a++) {
        const int64_t slot = perm[lo + a];
        const float wa = w[slot], *ya = Y + a * D + d0;
        float *o = acc + (slot / k) * D + d0;
        for (long d = 0; d < cols; d++) o[d] += wa * ya[d];
    }
    for (int r = 0; r < t; r++) {
        const float *o = acc + r * D + d0;
        if (dt)
            for (long d = 0; d < cols; d++) ((uint16_t *)out)[r * D + d0 + d] = f2bf(o[d]);
        else
            memcpy((float *)out + r * D + d0, o, cols * sizeof(float));
    }
}

#endif
