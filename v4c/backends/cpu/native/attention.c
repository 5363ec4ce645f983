/* Hybrid attention (sliding window + HCA's complete rows or CSA's top-k rows) one query row at a
 * time, over plain fp32 / bf16 / fp16 caches.
 *
 * A query meets exactly its visible keys, read in place: the ring rows and the call's tokens in
 * its window, then its compressed rows. The PyTorch paths instead compute blocks of queries
 * against every key of the block (about twice the window's products), gather a copy of each
 * query's CSA rows, and pass over the scores half a dozen times for masks and the softmax. Keys
 * are values (K = V, one KV head shared by all heads), so each key is widened to fp32 once per
 * pass and used by every head while it is in cache.
 * Arithmetic: q * scale, fp32 dot products, a softmax with the per-head sink as one more logit,
 * fp32 weighted sums, one rounding to the output dtype (as the references, up to summation order).
 * bf16 caches on AVX512-BF16 CPUs (`pairs`) take attention_bf16.c's products instead: bf16 pairs
 * multiplied exactly, fp32 sums, scale after the product, probabilities rounded to bf16 for the
 * weighted sum (as transformers' eager attention).
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16 (raw uint16 bits); the queries (and the output) may
 * have another dtype than the keys (an fp32 or fp16 model over bf16 caches).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

enum { SLIDING = 0, HCA = 1, CSA = 2 };

/* attention_bf16.c */
int v4c_attn_bf16(long D);
long v4c_attn_bf16_work(long n, int H, long D);
void v4c_attn_scores_bf16(const void *q, int H, long D, const void *const *keys, long n, float scale, float *s,
                          void *work);
void v4c_attn_values_bf16(const float *p, const void *const *keys, long n, int H, long D, float *o, void *work);

struct attn_job {
    int B, T, H, D, qdt, kdt, kind, window, ratio, W, N, K; /* qdt: q and out; kdt: kv, ring, rows */
    int groups; /* head groups per query row: work items are (row, group) */
    int pairs;  /* bf16 products on AVX512-BF16 (attention_bf16.c) */
    const char *q, *kv, *ring, *rows;
    const int64_t *ring_pos, *pos, *idx;
    const float *sinks;
    float scale;
    char *out;
    const unsigned char *contig; /* per sequence: its positions run p0, p0+1, ... then only -1 */
    long max_keys;
    int failed;
};

/* o[h] += p[h] * k for every head: o [H, D], k [D] */
V4C_CLONES static void accumulate(float *o, const float *p, const float *k, int H, long D) {
    for (int h = 0; h < H; h++) {
        const float w = p[h];
        float *oh = o + h * D;
        for (long d = 0; d < D; d++) oh[d] += w * k[d];
    }
}

/* o[h] = sum_k p[k, h] * rows[k] for every head, keys in order: o [H, D], p [n, H], rows: n fp32 rows of D.
 * Two heads x 32 columns per pass over the keys, in registers: each key row loaded once serves both
 * heads. D % 32 == 0. */
V4C_CLONES static void weighted_sum(float *o, const float *p, const float *const *rows, long n, int H, long D) {
    int h = 0;
    for (; h < H; h += 2) {
        const int two = h + 1 < H;
        for (long d0 = 0; d0 < D; d0 += 32) {
            v8f a[4] = {{0}}, b[4] = {{0}}, x;
            for (long k = 0; k < n; k++) {
                const float *row = rows[k] + d0;
                const float pa = p[k * H + h], pb = two ? p[k * H + h + 1] : 0.0f;
                for (int c = 0; c < 4; c++) {
                    LD8(x, row + 8 * c);
                    a[c] += pa * x;
                    b[c] += pb * x;
                }
            }
            memcpy(o + h * D + d0, a, sizeof a);
            if (two) memcpy(o + (h + 1) * D + d0, b, sizeof b);
        }
    }
}

/* s0[h] = dot(q + h * D, k0, D) and s1[h] = dot(q + h * D, k1, D) for every head: two keys per
 * pass over the queries (each query load serves both), four heads x two keys in flight, reduced
 * in dot()'s order (HSUM8X8), so the same values as dots() per key. D % 8 == 0. */
V4C_CLONES static void dots2(const float *q, const float *k0, const float *k1, long D, int H, float *s0, float *s1) {
    int h = 0;
    for (; h + 4 <= H; h += 4) {
        v8f acc[8] = {{0}}, a, b, x;
        for (long d = 0; d < D; d += 8) {
            LD8(a, k0 + d);
            LD8(b, k1 + d);
            for (int i = 0; i < 4; i++) {
                LD8(x, q + (h + i) * D + d);
                acc[2 * i] += x * a;
                acc[2 * i + 1] += x * b;
            }
        }
        float t[8];
        HSUM8X8(acc, t);
        for (int i = 0; i < 4; i++) {
            s0[h + i] = t[2 * i];
            s1[h + i] = t[2 * i + 1];
        }
    }
    for (; h < H; h++) {
        s0[h] = dot(q + h * D, k0, D);
        s1[h] = dot(q + h * D, k1, D);
    }
}

/* The softmax's numerators of one row's scores s [n, H], in place, and their sums den [H]: per head the
 * max over its keys and its sink (one more logit), s <- e^(s - max), den = e^(sink - max) + the keys' in
 * key order. Eight heads a vector (V8_EXP, within 1 ulp of expf; every head through the same lanes' code,
 * so a head's values do not depend on how the heads are grouped): libm's expf, a call per score, was
 * ~3% of a 4,096-token prefill. */
V4C_CLONES static void softmax_exp(float *s, long n, int H, const float *sinks, float *mx, float *den) {
    for (int h = 0; h < H; h++) {
        float m = sinks[h];
        for (long k = 0; k < n; k++)
            if (s[k * H + h] > m) m = s[k * H + h];
        mx[h] = m;
    }
    for (int h0 = 0; h0 < H; h0 += 8) {
        const int m = H - h0 < 8 ? H - h0 : 8;
        v8f mv = {0}, sv = {0};
        memcpy(&mv, mx + h0, m * sizeof(float));
        memcpy(&sv, sinks + h0, m * sizeof(float));
        v8f dv = V8_EXP(sv - mv);
        if (m == 8) {
            for (long k = 0; k < n; k++) {
                v8f x;
                LD8(x, s + k * H + h0);
                const v8f p = V8_EXP(x - mv);
                memcpy(s + k * H + h0, &p, sizeof p);
                dv += p;
            }
        } else {
            for (long k = 0; k < n; k++) {
                v8f x = {0};
                memcpy(&x, s + k * H + h0, m * sizeof(float));
                const v8f p = V8_EXP(x - mv);
                memcpy(s + k * H + h0, &p, m * sizeof(float));
                dv += p;
            }
        }
        memcpy(den + h0, &dv, m * sizeof(float));
    }
}

static int visible(int64_t kp, int64_t qp, int window) { return kp >= 0 && kp <= qp && kp > qp - window; }

static void attn_rows(void *p, long a, long e, int tid) {
    (void)tid;
    struct attn_job *j = (struct attn_job *)p;
    const int T = j->T, G = j->groups;
    const long D = j->D, qsz = j->qdt ? 2 : 4, sz = j->kdt ? 2 : 4, HD = (long)j->H * D; /* the scratch: all heads */
    /* bf16 keys of a row widened once, for both passes, when they fit a bounded buffer (window +
     * compressed rows always do; only a call whose positions are not consecutive can exceed it);
     * fp32 keys are read where they lie */
    const long held = j->max_keys < 8192 ? j->max_keys : 8192, most = j->max_keys > 0 ? j->max_keys : 1;
    const int widened = j->kdt && !j->pairs;
    float *qs = malloc(sizeof(float) * (2 * HD + D + j->max_keys * j->H + 2 * j->H + (widened ? held * D : 0)));
    const char **keys = malloc(sizeof(char *) * most);
    const float **rowp = malloc(sizeof(float *) * most); /* each key's fp32 row */
    void *pw = j->pairs ? malloc(v4c_attn_bf16_work(held, j->H, D)) : 0;
    if (!qs || !keys || !rowp || (j->pairs && !pw)) {
        free(rowp);
        free(qs);
        free(keys);
        free(pw);
        j->failed = 1;
        return;
    }
    float *o = qs + HD, *kf = o + HD, *s = kf + D, *mx = s + j->max_keys * j->H, *den = mx + j->H;
    float *kall = den + j->H;
    for (long item = a; item < e; item++) {
        const long r = item / G, b = r / T, t = r % T;
        const int h0 = (int)((long)j->H * (item % G) / G), H = (int)((long)j->H * (item % G + 1) / G) - h0;
        const long off = (r * j->H + h0) * D; /* this row's first head of the group, in q and out */
        const int64_t qp = j->pos[r];
        long n = 0;
        for (int w = 0; w < j->W; w++)
            if (visible(j->ring_pos[b * j->W + w], qp, j->window)) keys[n++] = j->ring + (b * j->W + w) * D * sz;
        if (j->contig[b]) { /* positions are consecutive: the window is a range of the call's tokens */
            if (qp >= 0)
                for (long u = t - j->window + 1 > 0 ? t - j->window + 1 : 0; u <= t; u++)
                    keys[n++] = j->kv + (b * T + u) * D * sz;
        } else {
            for (long u = 0; u < T; u++)
                if (visible(j->pos[b * T + u], qp, j->window)) keys[n++] = j->kv + (b * T + u) * D * sz;
        }
        if (j->kind == HCA && qp >= 0) { /* row c is complete once token (c + 1) * ratio - 1 was seen */
            long nv = (long)((qp + 1) / j->ratio);
            if (nv > j->N) nv = j->N;
            for (long c = 0; c < nv; c++) keys[n++] = j->rows + (b * j->N + c) * D * sz;
        } else if (j->kind == CSA) {
            for (int k = 0; k < j->K; k++) {
                const int64_t c = j->idx[r * j->K + k];
                if (c >= 0 && c < j->N) keys[n++] = j->rows + (b * j->N + c) * D * sz;
            }
        }
        const int pairs = j->pairs && n <= held;
        if (pairs)
            v4c_attn_scores_bf16(j->q + off * qsz, H, D, (const void *const *)keys, n, j->scale, s, pw);
        else {
            widen(j->q + off * qsz, j->qdt, H * D, qs);
            for (long i = 0; i < H * D; i++) qs[i] *= j->scale;
        }
        const int hold = !pairs && (!j->kdt || n <= held) && D % 32 == 0;
        long k = pairs ? n : 0;
        if (hold) { /* keys in pairs: half the query loads per product */
            for (long i = 0; i < n; i++) {
                if (j->kdt) widen(keys[i], j->kdt, D, kall + i * D);
                rowp[i] = j->kdt ? kall + i * D : (const float *)keys[i];
            }
            for (; k + 2 <= n; k += 2) dots2(qs, rowp[k], rowp[k + 1], D, H, s + k * H, s + (k + 1) * H);
        }
        for (; k < n; k++) {
            if (!hold) widen(keys[k], j->kdt, D, kf);
            dots(qs, hold ? rowp[k] : kf, D, H, s + k * H);
        }
        softmax_exp(s, n, H, j->sinks + h0, mx, den);
        if (pairs) {
            v4c_attn_values_bf16(s, (const void *const *)keys, n, H, D, o, pw);
        } else if (hold) {
            weighted_sum(o, s, rowp, n, H, D);
        } else {
            memset(o, 0, sizeof(float) * H * D);
            for (long k = 0; k < n; k++) {
                widen(keys[k], j->kdt, D, kf);
                accumulate(o, s + k * H, kf, H, D);
            }
        }
        for (int h = 0; h < H; h++)
            for (long d = 0; d < D; d++) o[h * D + d] /= den[h];
        store(j->out + off * qsz, j->qdt, o, H * D);
    }
    free(qs);
    free(keys);
    free(rowp);
    free(pw);
}

/* The attention op for every query row of q [B, T, H, D] (kv [B, T, D] this call's rows, ring
 * [B, W, D] with ring_pos [B, W], rows [B, N, D] the compressed cache, idx [B, T, K] CSA's picks,
 * sinks [H] fp32, positions int64, -1 = empty / padding) into out [B, T, H, D] of q's dtype.
 * Rows split across up to `threads` threads; `pairs` asks for attention_bf16.c's products (taken
 * for bf16 with D % 16 == 0 on a CPU that has them). Returns 0, -1 for a bad kind or ratio, -2 when
 * scratch memory could not be allocated. */
int v4c_attention(int threads, int B, int T, int H, int D, int qdt, int kdt, int kind, int window, int ratio,
                  const void *q, const void *kv, const void *ring, const int64_t *ring_pos, int W,
                  const float *sinks, const int64_t *pos, const void *rows, int N, const int64_t *idx, int K,
                  float scale, int pairs, void *out) {
    if (kind < SLIDING || kind > CSA || (kind == HCA && ratio < 1)) return -1;
    unsigned char *contig = malloc(B > 0 ? B : 1);
    if (!contig) return -2;
    long widest = 0; /* the most call tokens one query can see */
    for (int b = 0; b < B; b++) {
        const int64_t *pb = pos + (long)b * T;
        int ok = 1, ended = pb[0] < 0;
        for (int u = 1; u < T && ok; u++) {
            if (pb[u] < 0)
                ended = 1;
            else
                ok = !ended && pb[u] == pb[0] + u;
        }
        contig[b] = (unsigned char)ok;
        const long seen = ok ? (window < T ? window : T) : T;
        if (seen > widest) widest = seen;
    }
    /* fewer rows than threads (decode steps): each row's heads split into groups as well */
    const long rows_all = (long)B * T;
    int groups = 1;
    if (rows_all > 0 && rows_all < threads) {
        groups = (int)((threads + rows_all - 1) / rows_all);
        if (groups > H) groups = H;
    }
    struct attn_job j = {B, T, H, D, qdt, kdt, kind, window, ratio, W, N, K, groups,
                         pairs && qdt == 1 && kdt == 1 && v4c_attn_bf16(D),
                         (const char *)q, (const char *)kv,
                         (const char *)ring, (const char *)rows, ring_pos, pos, idx, sinks, scale, (char *)out,
                         contig, W + widest + (kind == HCA ? N : kind == CSA ? K : 0), 0};
    v4c_parallel_rows(rows_all * groups, threads, 1, attn_rows, &j);
    free(contig);
    return j.failed ? -2 : 0;
}

/* The window ring's append for a call without padding: token u of row b (position p = pos[b, u] >= 0)
 * into slot p % W of ring [B, W, D] (elements of `size` bytes, kv [B, T, D] of the ring's dtype), and
 * p into ring_pos [B, W]. T <= W, so no two tokens of a row share a slot. Returns 0, or -1 for a
 * negative position or T > W (nothing written). */
int v4c_ring_append(long B, long T, long W, long D, int size, const void *kv, void *ring, int64_t *ring_pos,
                    const int64_t *pos) {
    if (T > W) return -1;
    for (long i = 0; i < B * T; i++)
        if (pos[i] < 0) return -1;
    for (long b = 0; b < B; b++)
        for (long u = 0; u < T; u++) {
            const int64_t p = pos[b * T + u];
            const long slot = (long)(p % W);
            memcpy((char *)ring + (b * W + slot) * D * size, (const char *)kv + (b * T + u) * D * size, D * size);
            ring_pos[b * W + slot] = p;
        }
    return 0;
}
