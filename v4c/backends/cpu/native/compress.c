/* The compressor's decode step after its two products, for B rows of one token each: what
 * backends/cpu/compressor.py did in ~8 PyTorch calls per step (~25 when a window closes), in one loop.
 *
 * Each row's token goes into its pending ring slot (position % slots; slots = ratio, or 2 * ratio
 * with overlap): kv widened to fp32, gate + ape[position % ratio] in fp32. A row whose token closes a
 * window (position + 1 a multiple of ratio) then pools it, per channel c < d: a softmax of the gates
 * over the window's tokens (with overlap, CSA's: the previous window's tokens on channel c, then this
 * window's on channel d + c) and the gate-weighted sum of their kv, in token order, into pooled[row];
 * RMSNorm, RoPE and the store stay with the caller (norm_rope.c). dt: 0 fp32, 1 bf16, 2 fp16 (kv, gate).
 * A prefill call's windows (v4c_compress_prefill) pool through the same function, its tokens read from the
 * call's rows, so decode steps and prefill calls pool the same bits. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* element i of a row of dtype dt, as fp32 */
static inline float at(const void *p, long i, int dt) {
    return dt ? half_to_f(((const uint16_t *)p)[i], dt) : ((const float *)p)[i];
}

/* What pooling reads: the call's rows (kv, gate [B, T, C] of dtype dt, positions from p0[b]) and the
 * pending rings (earlier tokens), read-only while windows pool. */
struct pool_src {
    long T;
    int C, m, slots, d, n, overlap, dt;
    const void *kv, *gate;
    const float *ape, *pend_kv, *pend_gate;
};

/* Pool the window of row b that position p closes into out[0 .. d): per channel, a softmax of the gates
 * over the window's tokens (CSA: the previous window's on channel c, this one's on d + c) and the
 * gate-weighted sum of their kv, in token order; tokens at or after p0 from the call's row b, earlier
 * ones from the ring, none before position 0 (the first CSA window's missing half). Eight channels at a
 * time; a channel's value does not depend on its lane, nor on where its tokens came from (the ring holds
 * the fp32 values the rows give: kv widened, gate widened + ape). */
V4C_CLONES static void pool_window(const struct pool_src *S, long b, int64_t p, int64_t p0, float *out) {
    const int m = S->m, n = S->n, d = S->d, C = S->C, slots = S->slots;
    const int64_t first = p + 1 - n;
    const int j0 = first < 0 ? (int)-first : 0;
    const float *rk = S->pend_kv + b * (long)slots * C, *rg = S->pend_gate + b * (long)slots * C;
    v8f g[n], k[n];
    for (int c0 = 0; c0 < d; c0 += 8) {
        const int w = d - c0 < 8 ? d - c0 : 8;
        for (int j = j0; j < n; j++) {
            const int64_t q = first + j;
            const long ch = c0 + (S->overlap && j >= m ? d : 0);
            float gk[8] = {0}, gg[8] = {0};
            if (q >= p0) { /* this call's token: as the ring would hold it */
                const long x = (b * S->T + (q - p0)) * (long)C + ch;
                const float *a = S->ape + (long)(q % m) * C + ch;
                for (int i = 0; i < w; i++) {
                    gk[i] = at(S->kv, x + i, S->dt);
                    gg[i] = at(S->gate, x + i, S->dt) + a[i];
                }
            } else {
                const long s = (long)(q % slots) * C + ch;
                for (int i = 0; i < w; i++) {
                    gk[i] = rk[s + i];
                    gg[i] = rg[s + i];
                }
            }
            LD8(k[j], gk);
            LD8(g[j], gg);
        }
        v8f mx = (v8f){0} - INFINITY, sum = {0}, acc = {0};
        for (int j = j0; j < n; j++) mx = V8_SEL(g[j] > mx, g[j], mx); /* (a NaN gate is passed over, as fmaxf does) */
        for (int j = j0; j < n; j++) {
            g[j] = V8_EXP(g[j] - mx);
            sum += g[j];
        }
        for (int j = j0; j < n; j++) acc += k[j] * (g[j] / sum);
        float o[8];
        memcpy(o, &acc, sizeof o);
        memcpy(out + c0, o, w * sizeof(float));
    }
}

/* token t of row b (position p) into its ring slot: kv widened to fp32, gate widened + ape[p % ratio] */
static void to_ring(const struct pool_src *S, float *pend_kv, float *pend_gate, long b, long t, int64_t p) {
    const int C = S->C;
    float *rk = pend_kv + b * (long)S->slots * C + (long)(p % S->slots) * C;
    float *rg = pend_gate + b * (long)S->slots * C + (long)(p % S->slots) * C;
    const long x = (b * S->T + t) * (long)C;
    const float *a = S->ape + (long)(p % S->m) * C;
    for (int c = 0; c < C; c++) {
        rk[c] = at(S->kv, x + c, S->dt);
        rg[c] = at(S->gate, x + c, S->dt) + a[c];
    }
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
    const struct pool_src S = {1, C, m, slots, d, overlap ? 2 * m : m, overlap, dt, kv, gate, ape, pend_kv, pend_gate};
    for (long b = 0; b < B; b++) {
        to_ring(&S, pend_kv, pend_gate, b, 0, pos[b]);
        if ((pos[b] + 1) % m == 0) pool_window(&S, b, pos[b], pos[b] + 1, pooled + b * (long)d); /* all from the ring */
    }
    return 0;
}

struct prefill_job {
    struct pool_src S;
    const int64_t *p0;    /* per row: its first position */
    const long *start;    /* per row: its first window among all (prefix sums, B + 1) */
    long B, W;
    float *pooled;
    int64_t *win;
};

static void pool_rows(void *ctx, long a, long e, int tid) {
    (void)tid;
    const struct prefill_job *J = (const struct prefill_job *)ctx;
    long b = 0;
    for (long i = a; i < e; i++) {
        while (J->start[b + 1] <= i) b++;
        const long k = i - J->start[b];
        const int64_t w = J->p0[b] / J->S.m + k; /* the row's windows: p0 / m onwards */
        const int64_t p = (w + 1) * J->S.m - 1;
        pool_window(&J->S, b, p, J->p0[b], J->pooled + (b * J->W + k) * (long)J->S.d);
        J->win[b * J->W + k] = w;
    }
}

/* A prefill call's tokens, B rows of T: each row's tokens at positions p0, p0 + 1, ... (the first n of its T
 * with a position >= 0; the rest, padding, negative). Each window a row closes pools as the decode step
 * pools it (pool_window), its tokens from the call or, before the call, from the ring: the same values
 * whether its tokens came in one call, several, or one step at a time; the windows split across `threads`.
 * Then each row's last tokens go into its ring. Window k that row b closes: pooled[(b W + k) d ..] and
 * win[b W + k] = its index (position / ratio); win -1 past the row's last. W: windows a row may close
 * (T / ratio + 1). Returns 0, or -1 (nothing written) when a row's positions are not consecutive from its
 * first or a valid one follows padding. */
int v4c_compress_prefill(int threads, long B, long T, int C, int ratio, int overlap, int dt, const void *kv,
                         const void *gate, const float *ape, float *pend_kv, float *pend_gate, const int64_t *pos,
                         float *pooled, int64_t *win, long W) {
    const int m = ratio, slots = overlap ? 2 * ratio : ratio, d = overlap ? C / 2 : C;
    int64_t *p0 = (int64_t *)malloc(sizeof(int64_t) * (B + 1));
    long *start = (long *)malloc(sizeof(long) * (B + 1)), *n = (long *)malloc(sizeof(long) * (B + 1));
    if (!p0 || !start || !n) {
        free(p0), free(start), free(n);
        return -2;
    }
    start[0] = 0;
    for (long b = 0; b < B; b++) { /* each row's valid tokens and windows, checked before anything is written */
        const int64_t *pr = pos + b * T;
        long t = 0;
        while (t < T && pr[t] >= 0 && pr[t] == pr[0] + t) t++;
        for (long u = t; u < T; u++)
            if (pr[u] >= 0) {
                free(p0), free(start), free(n);
                return -1;
            }
        n[b] = t;
        p0[b] = t ? pr[0] : 0;
        start[b + 1] = start[b] + (t ? (long)((p0[b] + t) / m - p0[b] / m) : 0);
    }
    for (long i = 0; i < B * W; i++) win[i] = -1;
    struct prefill_job J = {{T, C, m, slots, d, overlap ? 2 * m : m, overlap, dt, kv, gate, ape, pend_kv, pend_gate},
                            p0, start, B, W, pooled, win};
    /* a window is ~n x d multiply-adds and exponentials: a thread's share at least 16 of them */
    v4c_parallel_rows(start[B], threads, 16, pool_rows, &J);
    for (long b = 0; b < B; b++) /* then the rings: the last `slots` tokens of each row */
        for (long t = n[b] > slots ? n[b] - slots : 0; t < n[b]; t++) to_ring(&J.S, pend_kv, pend_gate, b, t, p0[b] + t);
    free(p0), free(start), free(n);
    return 0;
}
