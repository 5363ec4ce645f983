/* One instantiation of the dot-product kernel (see dots.h), included by dots.c once per
 * instruction set and weight dtype, so every variant has the same loops and differs only in its
 * vector operations. The includer defines:
 *   NAME, TARGET     the function's name and its target attribute
 *   LANES            elements of K per vector step
 *   VEC, ZERO(), HSUM(v)  the fp32 accumulator, a zero one, the sum of its lanes
 *   XT, XV, XLOAD(p) token-row element type, its vector, a load of LANES of them
 *   WT, WV, WLOAD(p) weight element type, its vector, a load of LANES of them
 *   MAC(acc, w, x)   acc + w * x, lane by lane (fp32 sums)
 *   XF(v), WF(v)     one element as fp32 (the tail of K that is not a whole step)
 * and this file undefines the ones that differ between instantiations.
 *
 * Register blocking: RW = 4 weight rows by RC <= 3 token rows of accumulators (twelve: with the three
 * token vectors and one weight vector, the sixteen registers of AVX2), the token rows' vectors loaded
 * once per step and each weight vector once per block, so a weight row is read from memory once and
 * reused from registers or L1 for every token row. Twelve independent sums also cover the FMA
 * latency (two pipes of ~5 cycles need ten); 4x3 takes 7 loads per 12 FMAs where the 2x4 blocks
 * before took 6 per 8, which matters in prefill calls, whose token rows come from L2.
 *
 * The RW rows of a block are not neighbours but S = N / RW rows apart (rows j, j + S, j + 2S, ...
 * for j < S): each of the RW streams then runs through one contiguous quarter (or half) of W, a long
 * sequential stream the hardware prefetcher follows. Neighbouring rows instead start RW new short
 * streams per block, which the prefetcher picks up late: measured on an AMD EPYC (Zen 2) streaming a
 * 32 MiB bf16 matrix from memory at c = 1, 9 GB/s for neighbouring rows of 2 KiB against 16-17 GB/s
 * for strided ones (fp32, rows of 4 KiB: 17 against 20; rows of 512 bytes, as the MoE's down
 * projection has: 7.5 against 15). A row's sum is the same in either order: the choice changes
 * nothing in the results. */

#define V4C_CAT_(a, b) a##b
#define V4C_CAT(a, b) V4C_CAT_(a, b)
#define BLK V4C_CAT(NAME, _block)

/* rows w + i * S * K (i < RW) against token rows x[0 .. RC): y[r * ldy + i * S] */
TARGET static inline __attribute__((always_inline)) void BLK(const WT *w, long S, long K, const XT *const *x,
                                                             float *y, long ldy, const int RW, const int RC) {
    VEC acc[4][3];
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) acc[i][r] = ZERO();
    const long kv = K - K % LANES;
    for (long k = 0; k < kv; k += LANES) {
        XV xv[3];
        for (int r = 0; r < RC; r++) xv[r] = XLOAD(x[r] + k);
        for (int i = 0; i < RW; i++) {
            const WV wv = WLOAD(w + i * S * K + k);
            for (int r = 0; r < RC; r++) acc[i][r] = MAC(acc[i][r], wv, xv[r]);
        }
    }
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) {
            float s = HSUM(acc[i][r]);
            for (long k = kv; k < K; k++) s += WF(w[i * S * K + k]) * XF(x[r][k]);
            y[r * ldy + i * S] = s;
        }
}

/* RW weight rows (S apart) against every token row, RC at a time (constants after inlining: no
 * loop overhead or spilled accumulators in the step loop). */
#define V4C_ROWS(RW)                                                                              \
    for (int r0 = 0; r0 < c; r0 += 3) {                                                           \
        const XT *const *xr = xs + r0;                                                            \
        float *yr = Y + r0 * ldy + o;                                                             \
        switch (c - r0 < 3 ? c - r0 : 3) {                                                        \
        case 1: BLK(w, S, K, xr, yr, ldy, RW, 1); break;                                          \
        case 2: BLK(w, S, K, xr, yr, ldy, RW, 2); break;                                          \
        default: BLK(w, S, K, xr, yr, ldy, RW, 3); break;                                         \
        }                                                                                         \
    }

TARGET void NAME(const void *W, long N, long K, const void *const *x, int c, float *Y, long ldy) {
    const XT *const *xs = (const XT *const *)x;
    long S = N / 4;
    for (long o = 0; o < S; o++) { /* rows o, o + S, o + 2S, o + 3S: four long streams */
        const WT *w = (const WT *)W + o * K;
        V4C_ROWS(4)
    }
    S = 1;
    for (long o = 4 * (N / 4); o < N; o++) { /* the last N % 4 rows, one at a time */
        const WT *w = (const WT *)W + o * K;
        V4C_ROWS(1)
    }
}

#undef V4C_ROWS
#undef BLK
#undef NAME
#undef WT
#undef WV
#undef WLOAD
#undef WF
