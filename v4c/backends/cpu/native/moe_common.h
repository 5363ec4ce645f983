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
