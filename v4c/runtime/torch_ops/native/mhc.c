/* mHC mixes in plain C, one token row at a time.
 *
 * A batch-1 decode step runs 2 * layers of these; in PyTorch each is ~60 tiny ops (the 20
 * Sinkhorn rounds on a 4x4 matrix alone are 120), i.e. ~350 us of dispatch for ~50 KFLOP.
 * In a prefill the same work is a dozen memory passes over [T, n, D] per mix. Here one call
 * does a row's post-mix, its mixing weights (sigmoid / softmax / Sinkhorn), collapse and
 * RMSNorm while the row is in cache, with the reference's roundings to the streams' dtype
 * (x1, the collapse and the norm's output are rounded; everything else is fp32).
 *
 * Entry points:
 *   v4c_hc_mix    decode sizes: everything, the logits' dot products included;
 *   v4c_hc_expand the post-mix alone (prefill: the logits are then one GEMM in PyTorch);
 *   v4c_hc_finish weights, Sinkhorn, collapse and norm from given logits (prefill).
 * dtype codes: 0 = float32, 1 = bfloat16 (raw uint16 bits).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

V4C_CLONES static void load(const void *p, int dt, float *out, long n) {
    if (dt) {
        const uint16_t *h = (const uint16_t *)p;
        for (long i = 0; i < n; i++) out[i] = bf2f(h[i]);
    } else {
        memcpy(out, p, n * sizeof(float));
    }
}

/* store in dtype dt; `v` is updated to the values as stored (the rounding later ops see) */
V4C_CLONES static void store(void *p, int dt, float *v, long n) {
    if (dt) {
        uint16_t *h = (uint16_t *)p;
        for (long i = 0; i < n; i++) {
            h[i] = f2bf(v[i]);
            v[i] = bf2f(h[i]);
        }
    } else {
        memcpy(p, v, n * sizeof(float));
    }
}


V4C_CLONES static float dot(const float *a, const float *b, long n) {
    /* eight independent partial sums: lets the compiler use vector lanes without -ffast-math */
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

static inline float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

static void sinkhorn(float *c, int n, int iters, float eps) {
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

/* X' = post_k * y + sum_j comb[j, k] X_j for one row: x, y as fp32 in xin / yf, result in xf */
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

enum { MIX = 1, HEAD = 2 };

/* From the row's streams xf (fp32, as stored) and raw logits m (dot products, not yet scaled by
 * the RMS): the weights, Sinkhorn, collapse and norm. `u` is D floats of scratch. */
V4C_CLONES static void finish_row(int n, long D, int mode, int xdt, int wdt, const float *xf, const float *mraw,
                       const float *base, const float *scale, const void *norm_w, float eps, float hc_eps,
                       int iters, void *h_out, float *po, float *cb, float *u) {
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
        sinkhorn(cb, n, iters, hc_eps);
    }
    /* the collapse, rounded to the streams' dtype as the reference's hc_collapse returns it */
    for (long d = 0; d < D; d++) {
        float v = 0;
        for (int j = 0; j < n; j++) v += pre[j] * xf[j * D + d];
        u[d] = xdt ? bf2f(f2bf(v)) : v;
    }
    float inv2 = 1.0f / sqrtf(dot(u, u, D) / (float)D + eps);
    for (long d = 0; d < D; d++) u[d] *= inv2;
    if (norm_w) {
        if (wdt) {
            const uint16_t *w = (const uint16_t *)norm_w;
            for (long d = 0; d < D; d++) u[d] *= bf2f(w[d]);
        } else {
            const float *w = (const float *)norm_w;
            for (long d = 0; d < D; d++) u[d] *= w[d];
        }
    }
    store(h_out, xdt, u, D);
}

/* Decode sizes, for each of `rows` token rows (streams X [n, D]):
 *   MIX:  X <- post_k * y + sum_j comb[j, k] X_j, written to x1_out (else X is read from x);
 *   m = X . fn^T * rsqrt(mean(X^2) + eps)                    (fn: [M, n*D], M = n or (n+2)n)
 *   HEAD: pre = sigmoid(m * scale[0] + base) + hc_eps
 *   else: pre = sigmoid(m[:n] s0 + b) + hc_eps, post = 2 sigmoid(m[n:2n] s1 + b),
 *         comb = sinkhorn(softmax_rows(m[2n:] s2 + b) + hc_eps)   -> post_out, comb_out
 *   h_out = rms_norm(sum_j pre_j X_j) * norm_w
 * work: (2n + 2) * D floats. Returns 0, or -1 when n is outside 1..8. */
int v4c_hc_mix(int rows, int n, int D, int mode, int xdt, int wdt,
               const void *x, const void *y, const float *post_in, const float *comb_in,
               const float *fn, const float *base, const float *scale, const void *norm_w,
               float eps, float hc_eps, int iters,
               void *x1_out, void *h_out, float *post_out, float *comb_out, float *work) {
    if (n < 1 || n > 8) return -1;
    const int M = (mode & HEAD) ? n : (n + 2) * n;
    const long nd = (long)n * D;
    float *xf = work, *xin = work + nd, *yf = work + 2 * nd, *u = work + 2 * nd + D;
    float m[80];
    for (long r = 0; r < rows; r++) {
        if (mode & MIX) {
            load((const char *)x + r * nd * (xdt ? 2 : 4), xdt, xin, nd);
            load((const char *)y + r * D * (xdt ? 2 : 4), xdt, yf, D);
            expand_row(n, D, xin, yf, post_in + r * n, comb_in + r * n * n, xf);
            store((char *)x1_out + r * nd * (xdt ? 2 : 4), xdt, xf, nd);
        } else {
            load((const char *)x + r * nd * (xdt ? 2 : 4), xdt, xf, nd);
        }
        for (int i = 0; i < M; i++) m[i] = dot(fn + (long)i * nd, xf, nd);
        finish_row(n, D, mode, xdt, wdt, xf, m, base, scale, norm_w, eps, hc_eps, iters,
                   (char *)h_out + r * D * (xdt ? 2 : 4),
                   (mode & HEAD) ? 0 : post_out + r * n, (mode & HEAD) ? 0 : comb_out + r * n * n, u);
    }
    return 0;
}

/* The post-mix alone for rows [r0, r1); with xf_out, also the rows as stored in fp32 (row r at
 * xf_out + (r - r0) * n * D: the logits GEMM's input without another conversion pass).
 * work: (2n + 1) * D floats. */
int v4c_hc_expand(long r0, long r1, int n, int D, int xdt, const void *x, const void *y, const float *post_in,
                  const float *comb_in, void *x1_out, float *xf_out, float *work) {
    if (n < 1 || n > 8) return -1;
    const long nd = (long)n * D;
    const int sz = xdt ? 2 : 4;
    float *xin = work + nd, *yf = work + 2 * nd;
    for (long r = r0; r < r1; r++) {
        float *xf = xf_out ? xf_out + (r - r0) * nd : work;
        load((const char *)x + r * nd * sz, xdt, xin, nd);
        load((const char *)y + r * D * sz, xdt, yf, D);
        expand_row(n, D, xin, yf, post_in + r * n, comb_in + r * n * n, xf);
        store((char *)x1_out + r * nd * sz, xdt, xf, nd);
    }
    return 0;
}

/* Weights, Sinkhorn, collapse and norm for rows [r0, r1) from the raw logits mraw [r1 - r0, M]
 * (X . fn^T, not yet scaled by the RMS). work: (n + 1) * D floats. */
int v4c_hc_finish(long r0, long r1, int n, int D, int mode, int xdt, int wdt, const void *x, const float *mraw,
                  const float *base, const float *scale, const void *norm_w, float eps, float hc_eps, int iters,
                  void *h_out, float *post_out, float *comb_out, float *work) {
    if (n < 1 || n > 8) return -1;
    const int M = (mode & HEAD) ? n : (n + 2) * n;
    const long nd = (long)n * D;
    const int sz = xdt ? 2 : 4;
    float *xf = work, *u = work + nd;
    for (long r = r0; r < r1; r++) {
        load((const char *)x + r * nd * sz, xdt, xf, nd);
        finish_row(n, D, mode, xdt, wdt, xf, mraw + (r - r0) * M, base, scale, norm_w, eps, hc_eps, iters,
                   (char *)h_out + r * D * sz,
                   (mode & HEAD) ? 0 : post_out + r * n, (mode & HEAD) ? 0 : comb_out + r * n * n, u);
    }
    return 0;
}
