/* The compressor's decode step after its two products, for B rows of one token each: what
 * backends/cpu/compressor.py did in ~8 PyTorch calls per step (~25 when a window closes), in one loop.
 *
 * Each row's token goes into its pending ring slot (position % slots; slots = ratio, or 2 * ratio
 * with overlap): kv widened to fp32, gate + ape[position % ratio] in fp32. A row whose token closes a
 * window (position + 1 a multiple of ratio) then pools it, per channel c < d: a softmax of the gates
 * over the window's tokens (with overlap, CSA's: the previous window's tokens on channel c, then this
 * window's on channel d + c) and the gate-weighted sum of their kv, in token order, into pooled[row];
 * RMSNorm, RoPE and the store stay with the caller (norm_rope.c). dt: 0 fp32, 1 bf16, 2 fp16 (kv, gate). */
#include <math.h>
#include <stdint.h>

#include "common.h"

/* element i of a row of dtype dt, as fp32 */
static inline float at(const void *p, long i, int dt) {
    return dt ? half_to_f(((const uint16_t *)p)[i], dt) : ((const float *)p)[i];
}

/* Returns 0, or -1 when a row's position is negative or a closing CSA window has no predecessor
 * (the caller's general path takes those). */
int v4c_compress_step(long B, int C, int ratio, int overlap, int dt, const void *kv, const void *gate,
                      const float *ape, float *pend_kv, float *pend_gate, const int64_t *pos, float *pooled) {
    const int m = ratio, slots = overlap ? 2 * ratio : ratio, d = overlap ? C / 2 : C;
    for (long b = 0; b < B; b++) {
        const int64_t p = pos[b];
        if (p < 0 || ((p + 1) % m == 0 && p + 1 < slots)) return -1;
    }
    for (long b = 0; b < B; b++) {
        const int64_t p = pos[b];
        float *rk = pend_kv + b * (long)slots * C, *rg = pend_gate + b * (long)slots * C;
        const long s = (long)(p % slots) * C;
        const float *a = ape + (long)(p % m) * C;
        for (int c = 0; c < C; c++) {
            rk[s + c] = at(kv, b * (long)C + c, dt);
            rg[s + c] = at(gate, b * (long)C + c, dt) + a[c];
        }
        if ((p + 1) % m) continue;
        /* the window's tokens, oldest first: positions first .. p (2m of them with overlap); where token
         * j's channel c lies in the pending slots (CSA: the previous window's on c, this one's on d + c) */
        const int n = overlap ? 2 * m : m;
        const int64_t first = p + 1 - n;
        long off[n];
        float e[n];
        for (int j = 0; j < n; j++) off[j] = (long)((first + j) % slots) * C + (overlap && j >= m ? d : 0);
        float *out = pooled + b * (long)d;
        for (int c = 0; c < d; c++) {
            float mx = -INFINITY, sum = 0.f, acc = 0.f;
            for (int j = 0; j < n; j++) mx = fmaxf(mx, rg[off[j] + c]);
            for (int j = 0; j < n; j++) sum += (e[j] = expf(rg[off[j] + c] - mx));
            for (int j = 0; j < n; j++) acc += rk[off[j] + c] * (e[j] / sum);
            out[c] = acc;
        }
    }
    return 0;
}
