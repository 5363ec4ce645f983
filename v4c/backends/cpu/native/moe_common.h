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

/* the clamped SwiGLU of n gate and up values (G, U) as the reference rounds it: for bf16 / fp16 (dt) each
 * step's result rounded to that dtype; activations as fp32 into a32, or as bf16 bits into a16. Eight values
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
            g = V8_ROUND(g, dt);
            u = V8_ROUND(u, dt);
        }
        g = V8_SEL(g > lim, (v8f){0} + lim, g); /* (a NaN stays NaN, as PyTorch's clamp keeps it) */
        u = V8_SEL(u < -lim, (v8f){0} - lim, V8_SEL(u > lim, (v8f){0} + lim, u));
        v8f s = g / (1.0f + V8_EXP(-g)), v;
        if (dt) s = V8_ROUND(s, dt);
        v = s * u;
        if (a16) {
            const v8u h = V8_BF16_BITS(v) >> 16;
            for (long k = 0; k < m; k++) a16[i + k] = (uint16_t)h[k];
        } else {
            if (dt) v = V8_ROUND(v, dt);
            if (m == 8)
                memcpy(a32 + i, &v, sizeof v);
            else
                memcpy(a32 + i, &v, m * sizeof(float));
        }
    }
}

/* columns [o0, o1) of c rows of Y (stride D), a down projection's fp32 sums, as stored in dtype dt (as the
 * reference's product rounds them); a loop per dtype, so bf16's rounding vectorises */
static inline void moe_round_cols(float *Y, int c, long D, long o0, long o1, int dt) {
    if (dt == 1)
        for (int r = 0; r < c; r++)
            for (long o = o0; o < o1; o++) Y[r * D + o] = round_to(Y[r * D + o], 1);
    else if (dt == 2)
        for (int r = 0; r < c; r++)
            for (long o = o0; o < o1; o++) Y[r * D + o] = round_to(Y[r * D + o], 2);
}

/* the last pass of both: columns [d0, d1) of every token's weighted sum of its experts' rows of Y
 * ([n + t, D]: one row per assignment, then the shared expert's t rows when `shared`), adding the
 * assignments in their order (perm[lo ..], token = slot / k), so the result does not depend on the
 * thread count; fp32 sums in acc [t, D], written to out as fp32 or rounded once to bf16 / fp16 (dt) */
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
        store_from((char *)out + (r * D + d0) * (dt ? 2 : 4), dt, o, cols);
    }
}

#endif
