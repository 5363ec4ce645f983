/* The MoE's products for experts that many token rows hit (a prefill's), fp32 on AVX2 + FMA: token
 * rows packed into panels of 16, each weight row broadcast one element at a time against a panel.
 *
 * Why not the dot kernels (dots.c) here: a dot product keeps a vector of partial sums per (weight
 * row, token row) pair, so each step loads a token vector as well as a weight vector, both from
 * cache: at 96 token rows per expert the token rows (192 KiB for D = 512) come from L2 for every
 * block of weight rows, and each block ends in horizontal sums. Measured on the Zen 2 machine:
 * ~100 GFLOP/s on 2 threads for a 512-token layer, ~80% of PyTorch's GEMM per core. Here a block of
 * RW <= 6 weight rows (12 KiB at K = 512: it stays in L1) runs against every panel of its expert:
 * per step of K, two vector loads of the panel (16 tokens, contiguous), RW broadcasts of a weight
 * and 2 RW multiply-adds into 12 accumulators, no horizontal sum; each output's sum runs over K in
 * order, on one thread, so results do not depend on the thread count.
 *
 * Panel layout: panel p holds token rows 16p .. 16p + 15 as [K][16] floats, zero past the last row. */
#include <string.h>

#include "common.h"
#include "panels.h"

/* panels of rows x[0 .. c) (each K floats): ceil(c / 16) of them at xp */
void v4c_pack_panels(const float *const *x, int c, long K, float *xp) {
    for (int p = 0; p * V4C_PANEL < c; p++) {
        float *dst = xp + (long)p * K * V4C_PANEL;
        const int n = c - p * V4C_PANEL < V4C_PANEL ? c - p * V4C_PANEL : V4C_PANEL;
        if (n < V4C_PANEL) memset(dst, 0, sizeof(float) * K * V4C_PANEL);
        for (int m = 0; m < n; m++) {
            const float *src = x[p * V4C_PANEL + m];
            for (long k = 0; k < K; k++) dst[k * V4C_PANEL + m] = src[k];
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define TARGET __attribute__((target("avx2,fma")))

/* acc[i][h] = sum over k of w[i * K + k] * xp[k * 16 + 8h .. +8], for i < RW (a constant after
 * inlining: twelve accumulators, the panel's two vectors and a broadcast fill AVX2's 16 registers) */
TARGET static inline __attribute__((always_inline)) void tile_h(const float *w, long K, const float *xp,
                                                                __m256 acc[6][2], const int RW, const int H) {
    __m256 s[6][2]; /* (local: written to acc once at the end, else GCC stores acc every step) */
    for (int i = 0; i < RW; i++) s[i][0] = s[i][1] = _mm256_setzero_ps();
    for (long k = 0; k < K; k++) {
        const __m256 x0 = _mm256_load_ps(xp + k * V4C_PANEL);
        const __m256 x1 = H == 2 ? _mm256_load_ps(xp + k * V4C_PANEL + 8) : x0;
        for (int i = 0; i < RW; i++) {
            const __m256 b = _mm256_broadcast_ss(w + i * K + k);
            s[i][0] = _mm256_fmadd_ps(b, x0, s[i][0]);
            if (H == 2) s[i][1] = _mm256_fmadd_ps(b, x1, s[i][1]);
        }
    }
    for (int i = 0; i < RW; i++) acc[i][0] = s[i][0], acc[i][1] = s[i][1];
}

/* the tile of a panel holding `rows` token rows: its first half alone when the rest is padding */
TARGET static inline __attribute__((always_inline)) void tile(const float *w, long K, const float *xp,
                                                              __m256 acc[6][2], const int RW, int rows) {
    if (rows <= 8) tile_h(w, K, xp, acc, RW, 1);
    else tile_h(w, K, xp, acc, RW, 2);
}

/* e^x lane by lane, |error| ~1 ulp: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts so r is exact
 * enough), e^r by a degree-6 polynomial (the Cephes single-precision coefficients), 2^n in the
 * exponent bits; x clamped so that 2^n stays a normal number */
TARGET static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* min(g, lim) * sigmoid(min(g, lim)) * clamp(u, -lim, lim), as moe.c's scalar loop (a NaN gate
 * becomes lim there too: the comparison is false) */
TARGET static inline __m256 swiglu8(__m256 g, __m256 u, __m256 lim) {
    g = _mm256_min_ps(g, lim);
    u = _mm256_min_ps(_mm256_max_ps(u, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    return _mm256_mul_ps(s, u);
}

#define V4C_RW_SWITCH(n, CALL)                                                                    \
    switch (n) {                                                                                  \
    case 1: CALL(1); break;                                                                       \
    case 2: CALL(2); break;                                                                       \
    case 3: CALL(3); break;                                                                       \
    case 4: CALL(4); break;                                                                       \
    case 5: CALL(5); break;                                                                       \
    default: CALL(6); break;                                                                      \
    }

TARGET static inline __attribute__((always_inline)) void swiglu_block(const float *gate, const float *up, long K,
                                                                      const float *xp, int c, float lim, float *ap,
                                                                      long ldp, const int RW) {
    const __m256 l = _mm256_set1_ps(lim);
    for (int p = 0; p * V4C_PANEL < c; p++) {
        const int rows = c - p * V4C_PANEL;
        /* the gate's tile goes to memory before the up rows run: the compiler would otherwise fuse the
         * two loops into one of 24 accumulators, spilled (half the rate, measured) */
        float g[6][V4C_PANEL] __attribute__((aligned(32)));
        __m256 acc[6][2];
        tile(gate, K, xp + (long)p * K * V4C_PANEL, acc, RW, rows);
        for (int i = 0; i < RW; i++) {
            _mm256_store_ps(g[i], acc[i][0]);
            _mm256_store_ps(g[i] + 8, acc[i][1]);
        }
        __asm__ volatile("" ::: "memory");
        tile(up, K, xp + (long)p * K * V4C_PANEL, acc, RW, rows);
        float *o = ap + (long)p * ldp;
        for (int i = 0; i < RW; i++)
            for (int h = 0; h < 2; h++)
                _mm256_store_ps(o + i * V4C_PANEL + 8 * h, swiglu8(_mm256_load_ps(g[i] + 8 * h), acc[i][h], l));
    }
}

TARGET void v4c_panel_swiglu(const float *gate, const float *up, long n, long K, const float *xp, int c, float lim,
                             float *ap, long ldp) {
    for (long i = 0; i < n; i += 6) {
#define CALL(RW) swiglu_block(gate + i * K, up + i * K, K, xp, c, lim, ap + i * V4C_PANEL, ldp, RW)
        V4C_RW_SWITCH(n - i, CALL)
#undef CALL
    }
}

TARGET static inline __attribute__((always_inline)) void rows_block(const float *w, long K, const float *xp, int c,
                                                                    float *y, long ldy, const int RW) {
    for (int p = 0; p * V4C_PANEL < c; p++) {
        const int rows = c - p * V4C_PANEL < V4C_PANEL ? c - p * V4C_PANEL : V4C_PANEL;
        __m256 acc[6][2];
        tile(w, K, xp + (long)p * K * V4C_PANEL, acc, RW, rows);
        float t[6][V4C_PANEL] __attribute__((aligned(32)));
        for (int i = 0; i < RW; i++) {
            _mm256_store_ps(t[i], acc[i][0]);
            _mm256_store_ps(t[i] + 8, acc[i][1]);
        }
        for (int m = 0; m < rows; m++)
            for (int i = 0; i < RW; i++) y[(long)(p * V4C_PANEL + m) * ldy + i] = t[i][m];
    }
}

TARGET void v4c_panel_rows(const float *w, long n, long K, const float *xp, int c, float *y, long ldy) {
    for (long i = 0; i < n; i += 6) {
#define CALL(RW) rows_block(w + i * K, K, xp, c, y + i, ldy, RW)
        V4C_RW_SWITCH(n - i, CALL)
#undef CALL
    }
}

int v4c_panels_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#else /* no x86-64 GCC / clang: the dot kernels' path runs instead */
int v4c_panels_available(void) { return 0; }
void v4c_panel_swiglu(const float *gate, const float *up, long n, long K, const float *xp, int c, float lim,
                      float *ap, long ldp) {
    (void)gate, (void)up, (void)n, (void)K, (void)xp, (void)c, (void)lim, (void)ap, (void)ldp;
}
void v4c_panel_rows(const float *w, long n, long K, const float *xp, int c, float *y, long ldy) {
    (void)w, (void)n, (void)K, (void)xp, (void)c, (void)y, (void)ldy;
}
#endif
