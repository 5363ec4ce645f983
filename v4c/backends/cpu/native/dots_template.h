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
 * and may define
 *   RCMAX            token rows a block holds (3 unless defined; 6 with 32 registers)
 *   HSUM8V(v, out)   out[j] = HSUM(v[j]) for eight accumulators at once, the same additions
 * and this file undefines the ones that differ between instantiations.
 *
 * Register blocking: RW = 4 weight rows by RC <= 3 token rows of accumulators (twelve: with the three
 * token vectors and one weight vector, the sixteen registers of AVX2), the token rows' vectors loaded
 * once per step and each weight vector once per block, so a weight row is read from memory once and
 * reused from registers or L1 for every token row. Twelve independent sums also cover the FMA
 * latency (two pipes of ~5 cycles need ten); 4x3 takes 7 loads per 12 FMAs where the 2x4 blocks
 * before took 6 per 8, which matters in prefill calls, whose token rows come from L2. With 32
 * registers (RCMAX 6) a block holds 4 x 6 sums: 10 loads per 24 FMAs. A block's sums never depend on
 * how many token rows it holds, so every blocking gives the same bits.
 *
 * The RW rows of a block are not neighbours but S = N / RW rows apart (rows j, j + S, j + 2S, ...
 * for j < S): each of the RW streams then runs through one contiguous quarter (or half) of W, a long
 * sequential stream the hardware prefetcher follows. Neighbouring rows instead start RW new short
 * streams per block, which the prefetcher picks up late: measured on an AMD EPYC (Zen 2) streaming a
 * 32 MiB bf16 matrix from memory at c = 1, 9 GB/s for neighbouring rows of 2 KiB against 16-17 GB/s
 * for strided ones (fp32, rows of 4 KiB: 17 against 20; rows of 512 bytes, as the MoE's down
 * projection has: 7.5 against 15). A row's sum is the same in either order: the choice changes
 * nothing in the results. */

#ifndef RCMAX /* token rows a block holds at most: 3 (4 x 3 sums) unless the includer has the registers */
#define RCMAX 3
#define V4C_RCMAX_DEFAULT
#endif

#define V4C_CAT_(a, b) a##b
#define V4C_CAT(a, b) V4C_CAT_(a, b)
#define BLK V4C_CAT(NAME, _block)

/* rows w + i * S * K (i < RW) against token rows x[0 .. RC): y[r * ldy + i * S]; pf: prefetch the
 * weight streams ahead as non-temporal (see NAME) */
TARGET static inline __attribute__((always_inline)) void BLK(const WT *w, long S, long K, const XT *const *x,
                                                             float *y, long ldy, const int RW, const int RC,
                                                             const int pf) {
    VEC acc[4 * RCMAX];
    for (int i = 0; i < RW * RC; i++) acc[i] = ZERO();
    const long kv = K - K % LANES;
    for (long k = 0; k < kv; k += LANES) {
        XV xv[RCMAX];
        for (int r = 0; r < RC; r++) xv[r] = XLOAD(x[r] + k);
        for (int i = 0; i < RW; i++) {
            if (pf) __builtin_prefetch(w + i * S * K + k + V4C_PF_BYTES / sizeof(WT), 0, 0);
            const WV wv = WLOAD(w + i * S * K + k);
            for (int r = 0; r < RC; r++) acc[i * RC + r] = MAC(acc[i * RC + r], wv, xv[r]);
        }
    }
    float s[4 * RCMAX];
    int n = 0;
#ifdef HSUM8V
    for (; n + 8 <= RW * RC; n += 8) HSUM8V(acc + n, s + n); /* eight at once, in HSUM's order */
#endif
    for (; n < RW * RC; n++) s[n] = HSUM(acc[n]);
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) {
            float t = s[i * RC + r];
            for (long k = kv; k < K; k++) t += WF(w[i * S * K + k]) * XF(x[r][k]);
            y[r * ldy + i * S] = t;
        }
}

/* RW weight rows (S apart) against every token row, RC at a time (RW, RC and the prefetch switch
 * constants after inlining: no loop overhead, branch or spilled accumulator in the step loop). */
#if RCMAX == 6
#define V4C_GROUP(RW, PF)                                                                         \
    switch (c - r0 < 6 ? c - r0 : 6) {                                                            \
    case 1: BLK(w, S, K, xr, yr, ldy, RW, 1, PF); break;                                          \
    case 2: BLK(w, S, K, xr, yr, ldy, RW, 2, PF); break;                                          \
    case 3: BLK(w, S, K, xr, yr, ldy, RW, 3, PF); break;                                          \
    case 4: BLK(w, S, K, xr, yr, ldy, RW, 4, PF); break;                                          \
    case 5: BLK(w, S, K, xr, yr, ldy, RW, 5, PF); break;                                          \
    default: BLK(w, S, K, xr, yr, ldy, RW, 6, PF); break;                                         \
    }
#else
#define V4C_GROUP(RW, PF)                                                                         \
    switch (c - r0 < 3 ? c - r0 : 3) {                                                            \
    case 1: BLK(w, S, K, xr, yr, ldy, RW, 1, PF); break;                                          \
    case 2: BLK(w, S, K, xr, yr, ldy, RW, 2, PF); break;                                          \
    default: BLK(w, S, K, xr, yr, ldy, RW, 3, PF); break;                                         \
    }
#endif
#define V4C_ROWS(RW)                                                                              \
    for (int r0 = 0; r0 < c; r0 += RCMAX) {                                                       \
        const XT *const *xr = xs + r0;                                                            \
        float *yr = Y + r0 * ldy + o;                                                             \
        if (pf) {                                                                                 \
            V4C_GROUP(RW, 1)                                                                      \
        } else {                                                                                  \
            V4C_GROUP(RW, 0)                                                                      \
        }                                                                                         \
    }

TARGET void NAME(const void *W, long N, long K, const void *const *x, int c, float *Y, long ldy) {
    const XT *const *xs = (const XT *const *)x;
    /* With at most 3 token rows every weight is read once: fetched as non-temporal a few lines ahead,
     * the weights do not push the caches' other contents out (the interpreter's, the activations',
     * the next op's), which a decode step's ~100 products would otherwise make every op refetch: on
     * the Zen 2 machine the 478M bf16 decode step went from 10.0 to 8.5 ms, fp32 from 14.1 to 13.0.
     * Not with more rows: a block is then read again for each 3 of them, and a non-temporal line
     * leaving L1 goes back to memory (a 512-token fp32 prefill's experts took 1.6x as long). */
    const int pf = c <= 3;
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
#undef V4C_GROUP
#undef BLK
#undef NAME
#undef WT
#undef WV
#undef WLOAD
#undef WF
#ifdef V4C_RCMAX_DEFAULT
#undef RCMAX
#undef V4C_RCMAX_DEFAULT
#endif
