/* mHC mixes in plain C, one token row at a time.
 *
 * A batch-1 decode step runs 2 * layers of these; in PyTorch each is ~60 tiny ops (the 20
 * Sinkhorn rounds on a 4x4 matrix alone are 120), i.e. ~350 us of dispatch for ~50 KFLOP.
 * In a prefill the same work is a dozen memory passes over [T, n, D] per mix. Here one call
 * does a row's post-mix, its mixing weights (sigmoid / softmax / Sinkhorn), collapse and
 * RMSNorm while the row is in cache, with the reference's roundings to the streams' dtype
 * (x1, the collapse and the norm's output are rounded; everything else is fp32).
 *
 * One entry point, v4c_hc_mix, for decode steps and prefills alike: per row, the post-mix, the
 * logits' dot products, the weights and the collapse, rows split across PyTorch's threads. (An
 * earlier prefill path ran the logits as a PyTorch GEMM between two C passes: three hand-offs
 * between PyTorch's threads and ours per chunk, and an fp32 copy of the streams, cost more than
 * the GEMM saved.)
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16 (raw uint16 bits).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

static inline float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

static inline __attribute__((always_inline)) void sinkhorn(float *c, int n, int iters, float eps) {
    /* the reference's order: a column normalisation, then iters - 1 (row, column) rounds */
    for (int it = 0; it < iters; it++) {
        if (it > 0)
            for (int i = 0; i < n; i++) {
                float s = 0;
                for (int j = 0; j < n; j++) s += c[i * n + j];
                s += eps;
                for (int j = 0; j < n; j++) c[i * n + j] /= s;
            }
        for (int j = 0; j < n; j++) {
            float s = 0;
            for (int i = 0; i < n; i++) s += c[i * n + j];
            s += eps;
            for (int i = 0; i < n; i++) c[i * n + j] /= s;
        }
    }
}

/* sinkhorn() on the 4 x 4 matrices of `rows` rows at once (c: [rows, 16]), eight rows in the 8 lanes of each
 * vector: the same additions in the same order and the same divisions per matrix, so the same bits, with
 * one vector division where the row-by-row loop did eight. (A prefill's mixes spent about a third of their
 * time in those 640 divisions per row.) The last group's spare lanes hold ones and are not stored. */
V4C_CLONES static void sinkhorn4_rows(float *c, long rows, int iters, float eps) {
    for (long r0 = 0; r0 < rows; r0 += 8) {
        const int nb = rows - r0 < 8 ? (int)(rows - r0) : 8;
        v8f m[16];
        for (int e = 0; e < 16; e++)
            for (int b = 0; b < 8; b++) m[e][b] = b < nb ? c[(r0 + b) * 16 + e] : 1.0f;
        for (int it = 0; it < iters; it++) {
            if (it > 0)
                for (int i = 0; i < 4; i++) {
                    const v8f t = ((((v8f){0} + m[4 * i]) + m[4 * i + 1]) + m[4 * i + 2]) + m[4 * i + 3] + eps;
                    for (int j = 0; j < 4; j++) m[4 * i + j] /= t;
                }
            for (int j = 0; j < 4; j++) {
                const v8f t = ((((v8f){0} + m[j]) + m[4 + j]) + m[8 + j]) + m[12 + j] + eps;
                for (int i = 0; i < 4; i++) m[4 * i + j] /= t;
            }
        }
        for (int e = 0; e < 16; e++)
            for (int b = 0; b < nb; b++) c[(r0 + b) * 16 + e] = m[e][b];
    }
}

/* X' = post_k * y + sum_j comb[j, k] X_j for one row: x, y and the result xf in fp32 */
V4C_CLONES static void expand_row(int n, long D, const float *xin, const float *yf, const float *po, const float *cb, float *xf) {
    for (int k = 0; k < n; k++) {
        float *o = xf + k * D;
        for (long d = 0; d < D; d++) o[d] = po[k] * yf[d];
        for (int j = 0; j < n; j++) {
            const float c = cb[j * n + k], *xj = xin + j * D;
            for (long d = 0; d < D; d++) o[d] += c * xj[d];
        }
    }
}

typedef uint16_t v8h __attribute__((vector_size(16)));

/* 8 bf16 values to fp32: the bits moved to the top half */
#define BF8(v, p) do { v8h h_; memcpy(&h_, (p), sizeof h_); v8u u_ = __builtin_convertvector(h_, v8u) << 16; \
                       memcpy(&(v), &u_, sizeof(v8f)); } while (0)

/* 8 fp32 to bf16 as f2bf() rounds them (to nearest even, NaN kept quiet), stored at p16; v becomes
 * the values as stored */
#define ROUND8(v, p16) do { const v8u r_ = V8_BF16_BITS(v); \
        v8h h_ = __builtin_convertvector(r_ >> 16, v8h); memcpy((p16), &h_, sizeof h_); \
        memcpy(&(v), &r_, sizeof(v8f)); } while (0)

/* expand_row + store for bf16 streams in one pass over 8 columns at a time (D % 8 == 0): the same
 * products and sums in the same order, so the same values; x1 gets the rounded bf16, xf its fp32 */
static inline __attribute__((always_inline)) void expand_bf16_n(int n, long D, const uint16_t *x, const uint16_t *y,
                                                                  const float *po, const float *cb, uint16_t *x1,
                                                                  float *xf) {
    for (long d = 0; d < D; d += 8) {
        v8f yv, xv[8];
        BF8(yv, y + d);
        for (int j = 0; j < n; j++) BF8(xv[j], x + j * D + d);
        for (int k = 0; k < n; k++) {
            v8f o = po[k] * yv;
            for (int j = 0; j < n; j++) o += cb[j * n + k] * xv[j];
            ROUND8(o, x1 + k * D + d);
            memcpy(xf + k * D + d, &o, sizeof o);
        }
    }
}

V4C_CLONES static void expand_bf16(int n, long D, const uint16_t *x, const uint16_t *y, const float *po,
                                   const float *cb, uint16_t *x1, float *xf) {
    if (n == 4) /* V4's stream count: with n known the streams' 8 columns stay in registers */
        expand_bf16_n(4, D, x, y, po, cb, x1, xf);
    else
        expand_bf16_n(n, D, x, y, po, cb, x1, xf);
}

/* LOGIT_ROWS token rows' logits, 3 rows of fn at a time: m[b * 80 + i] = dot(fn + i * nd, x + b * nd, nd),
 * each sum in dot()'s lanes, order and roundings (so the same bits as dots()), every vector of fn
 * loaded once for the LOGIT_ROWS rows: fn (M x nD fp32, 196 KiB at D = 512) comes from L2 once per
 * LOGIT_ROWS rows instead of once per row. 3 x 3 sums, three x vectors, one of fn and the product
 * (no contraction: products and sums round apart, as dot()'s) fit AVX2's 16 registers. */
#define LOGIT_ROWS 3 /* logits_rows is written out for three rows */
static inline __attribute__((always_inline)) void logits_rows(const float *fn, const float *x, long nd, int M,
                                                               float *m) {
    const long n8 = nd & ~7L;
    int i = 0;
    for (; i + 3 <= M; i += 3) {
        v8f s00 = {0}, s01 = {0}, s02 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s20 = {0}, s21 = {0}, s22 = {0};
        const float *f0 = fn + i * nd, *f1 = f0 + nd, *f2 = f1 + nd;
        const float *x0 = x, *x1 = x + nd, *x2 = x + 2 * nd;
        for (long d = 0; d < n8; d += 8) {
            v8f a0, a1, a2, a;
            LD8(a0, x0 + d);
            LD8(a1, x1 + d);
            LD8(a2, x2 + d);
            LD8(a, f0 + d);
            s00 += a * a0, s01 += a * a1, s02 += a * a2;
            LD8(a, f1 + d);
            s10 += a * a0, s11 += a * a1, s12 += a * a2;
            LD8(a, f2 + d);
            s20 += a * a0, s21 += a * a1, s22 += a * a2;
        }
        const v8f s[3][3] = {{s00, s01, s02}, {s10, s11, s12}, {s20, s21, s22}};
        for (int r = 0; r < 3; r++)
            for (int b = 0; b < 3; b++) {
                float t = HSUM8(s[r][b]);
                for (long d = n8; d < nd; d++) t += fn[(i + r) * nd + d] * x[b * nd + d];
                m[b * 80 + i + r] = t;
            }
    }
    for (; i < M; i++)
        for (int b = 0; b < LOGIT_ROWS; b++) m[b * 80 + i] = dot(fn + i * nd, x + b * nd, nd);
}

V4C_CLONES static void logits_block(const float *fn, const float *x, long nd, int M, float *m) {
    logits_rows(fn, x, nd, M, m);
}

enum { MIX = 1, HEAD = 2 };

/* whether mix_range runs Sinkhorn on its rows' matrices together (V4's four streams: sinkhorn4_rows) rather
 * than finish_row one matrix at a time */
static inline int sinkhorn_batched(int n, int mode) { return n == 4 && !(mode & HEAD); }

/* scratch floats per thread: LOGIT_ROWS rows' streams, one row's inputs widened, y, the collapse */
#define V4C_HC_WORK(n, D) ((LOGIT_ROWS * (long)(n) + (n) + 2) * (long)(D))

/* From the row's streams xf (fp32, as stored) and raw logits m (dot products, not yet scaled by
 * the RMS): the weights, Sinkhorn, collapse and norm. `u` is D floats of scratch. */
static inline __attribute__((always_inline)) void finish_row_n(
        int n, long D, int mode, int xdt, int wdt, const float *xf, const float *mraw, const float *base,
        const float *scale, const void *norm_w, float eps, float hc_eps, int iters, void *h_out, float *po, float *cb,
        float *u) {
    const int M = (mode & HEAD) ? n : (n + 2) * n;
    const long nd = n * D;
    float m[80], pre[8];
    float inv = 1.0f / sqrtf(dot(xf, xf, nd) / (float)nd + eps);
    for (int i = 0; i < M; i++) m[i] = mraw[i] * inv;
    if (mode & HEAD) {
        for (int j = 0; j < n; j++) pre[j] = sigmoid(m[j] * scale[0] + base[j]) + hc_eps;
    } else {
        for (int j = 0; j < n; j++) {
            pre[j] = sigmoid(m[j] * scale[0] + base[j]) + hc_eps;
            po[j] = 2.0f * sigmoid(m[n + j] * scale[1] + base[n + j]);
        }
        for (int i = 0; i < n; i++) {
            float *row = cb + i * n, mx = -INFINITY, s = 0;
            for (int j = 0; j < n; j++) {
                row[j] = m[2 * n + i * n + j] * scale[2] + base[2 * n + i * n + j];
                if (row[j] > mx) mx = row[j];
            }
            for (int j = 0; j < n; j++) s += (row[j] = expf(row[j] - mx));
            for (int j = 0; j < n; j++) row[j] = row[j] / s + hc_eps;
        }
        if (!sinkhorn_batched(n, mode)) sinkhorn(cb, n, iters, hc_eps);
    }
    /* the collapse, rounded to the streams' dtype as the reference's hc_collapse returns it */
    for (long d = 0; d < D; d++) {
        float v = 0;
        for (int j = 0; j < n; j++) v += pre[j] * xf[j * D + d];
        u[d] = round_to(v, xdt);
    }
    float inv2 = 1.0f / sqrtf(dot(u, u, D) / (float)D + eps);
    for (long d = 0; d < D; d++) u[d] *= inv2;
    if (norm_w) {
        if (wdt) {
            const uint16_t *w = (const uint16_t *)norm_w;
            for (long d = 0; d < D; d++) u[d] *= half_to_f(w[d], wdt);
        } else {
            const float *w = (const float *)norm_w;
            for (long d = 0; d < D; d++) u[d] *= w[d];
        }
    }
    store(h_out, xdt, u, D);
}

V4C_CLONES static void finish_row(int n, long D, int mode, int xdt, int wdt, const float *xf, const float *mraw,
                                  const float *base, const float *scale, const void *norm_w, float eps, float hc_eps,
                                  int iters, void *h_out, float *po, float *cb, float *u) {
    /* n and the streams' dtype constants after inlining (V4's 4 streams; each dtype's rounding loop its own) */
#define V4C_FINISH(N, XDT) finish_row_n(N, D, mode, XDT, wdt, xf, mraw, base, scale, norm_w, eps, hc_eps, iters, h_out, \
                                        po, cb, u)
    if (n == 4)
        xdt == 1 ? V4C_FINISH(4, 1) : xdt == 2 ? V4C_FINISH(4, 2) : V4C_FINISH(4, 0);
    else
        xdt == 1 ? V4C_FINISH(n, 1) : xdt == 2 ? V4C_FINISH(n, 2) : V4C_FINISH(n, 0);
#undef V4C_FINISH
}

/* The rows [0, rows) of one range (streams X [n, D] per row):
 *   MIX:  X <- post_k * y + sum_j comb[j, k] X_j, written to x1_out (else X is read from x);
 *   m = X . fn^T * rsqrt(mean(X^2) + eps)                    (fn: [M, n*D], M = n or (n+2)n)
 *   HEAD: pre = sigmoid(m * scale[0] + base) + hc_eps
 *   else: pre = sigmoid(m[:n] s0 + b) + hc_eps, post = 2 sigmoid(m[n:2n] s1 + b),
 *         comb = sinkhorn(softmax_rows(m[2n:] s2 + b) + hc_eps)   -> post_out, comb_out
 *   h_out = rms_norm(sum_j pre_j X_j) * norm_w
 * work: V4C_HC_WORK(n, D) floats. */
static void mix_range(long rows, int n, int D, int mode, int xdt, int wdt,
                      const void *x, const void *y, const float *post_in, const float *comb_in,
                      const float *fn, const float *base, const float *scale, const void *norm_w,
                      float eps, float hc_eps, int iters,
                      void *x1_out, void *h_out, float *post_out, float *comb_out, float *work) {
    const int M = (mode & HEAD) ? n : (n + 2) * n;
    const long nd = (long)n * D;
    /* LOGIT_ROWS rows' streams at once (their logits share each load of fn), then one row at a time */
    float *xfs = work, *xin = work + LOGIT_ROWS * nd, *yf = xin + nd, *u = yf + D;
    float m[LOGIT_ROWS * 80];
    for (long r0 = 0; r0 < rows; r0 += LOGIT_ROWS) {
        const int nb = rows - r0 < LOGIT_ROWS ? (int)(rows - r0) : LOGIT_ROWS;
        if (!xdt) { /* fp32 streams: mixed from the call's rows straight into x1, which (or x, unmixed) then is
                     * the rows' fp32 copy for the logits and the collapse: nothing widened or stored */
            for (int b = 0; b < nb && (mode & MIX); b++) {
                const long r = r0 + b;
                expand_row(n, D, (const float *)x + r * nd, (const float *)y + r * D, post_in + r * n,
                           comb_in + r * n * n, (float *)x1_out + r * nd);
            }
            xfs = (mode & MIX) ? (float *)x1_out + r0 * nd : (float *)x + r0 * nd;
        } else { /* bf16 / fp16 streams: widened into scratch */
            for (int b = 0; b < nb; b++) {
                const long r = r0 + b;
                float *xf = xfs + b * nd;
                if ((mode & MIX) && D % 8 == 0 && xdt == 1) {
                    expand_bf16(n, D, (const uint16_t *)x + r * nd, (const uint16_t *)y + r * D, post_in + r * n,
                                comb_in + r * n * n, (uint16_t *)x1_out + r * nd, xf);
                } else if (mode & MIX) {
                    widen((const char *)x + r * nd * 2, xdt, nd, xin);
                    widen((const char *)y + r * D * 2, xdt, D, yf);
                    expand_row(n, D, xin, yf, post_in + r * n, comb_in + r * n * n, xf);
                    store((char *)x1_out + r * nd * 2, xdt, xf, nd);
                } else {
                    widen((const char *)x + r * nd * 2, xdt, nd, xf);
                }
            }
        }
        if (nb == LOGIT_ROWS)
            logits_block(fn, xfs, nd, M, m);
        else
            for (int b = 0; b < nb; b++) dots(fn, xfs + b * nd, nd, M, m + b * 80);
        for (int b = 0; b < nb; b++) {
            const long r = r0 + b;
            finish_row(n, D, mode, xdt, wdt, xfs + b * nd, m + b * 80, base, scale, norm_w, eps, hc_eps, iters,
                       (char *)h_out + r * D * (xdt ? 2 : 4),
                       (mode & HEAD) ? 0 : post_out + r * n, (mode & HEAD) ? 0 : comb_out + r * n * n, u);
        }
    }
    if (sinkhorn_batched(n, mode)) sinkhorn4_rows(comb_out, rows, iters, hc_eps);
}

struct mix_job {
    int n, D, mode, xdt, wdt, iters;
    const char *x, *y;
    const float *post_in, *comb_in, *fn, *base, *scale;
    const void *norm_w;
    float eps, hc_eps;
    char *x1_out, *h_out;
    float *post_out, *comb_out, *work;
};

static void mix_job_rows(void *p, long a, long e, int tid) {
    const struct mix_job *j = (const struct mix_job *)p;
    const int n = j->n;
    const long nd = (long)n * j->D, sz = j->xdt ? 2 : 4;
#define AT(ptr, per_row) ((ptr) ? (ptr) + a * (per_row) : 0)
    mix_range(e - a, n, j->D, j->mode, j->xdt, j->wdt, AT(j->x, nd * sz), AT(j->y, j->D * sz), AT(j->post_in, n),
              AT(j->comb_in, n * n), j->fn, j->base, j->scale, j->norm_w, j->eps, j->hc_eps, j->iters,
              AT(j->x1_out, nd * sz), AT(j->h_out, j->D * sz), AT(j->post_out, n), AT(j->comb_out, n * n),
              j->work + (long)tid * V4C_HC_WORK(n, j->D));
#undef AT
}

/* scratch floats per thread of v4c_hc_mix */
long v4c_hc_work(int n, int D) { return V4C_HC_WORK(n, D); }

/* mix_range over `rows` token rows, split across up to `threads` threads (two rows or more each).
 * work: threads * v4c_hc_work(n, D) floats. Returns 0, or -1 when n is outside 1..8. */
int v4c_hc_mix(int threads, long rows, int n, int D, int mode, int xdt, int wdt,
               const void *x, const void *y, const float *post_in, const float *comb_in,
               const float *fn, const float *base, const float *scale, const void *norm_w,
               float eps, float hc_eps, int iters,
               void *x1_out, void *h_out, float *post_out, float *comb_out, float *work) {
    if (n < 1 || n > 8) return -1;
    struct mix_job j = {n, D, mode, xdt, wdt, iters, (const char *)x, (const char *)y, post_in, comb_in, fn, base,
                        scale, norm_w, eps, hc_eps, (char *)x1_out, (char *)h_out, post_out, comb_out, work};
    v4c_parallel_rows(rows, threads, 2, mix_job_rows, &j);
    return 0;
}
