/* quant.c's products on AVX512-BF16 CPUs: weights decoded in registers straight to bf16 and multiplied
 * with vdpbf16ps, 32 products a token row in one instruction, where the AVX2 kernels widen each weight
 * to fp32 and spend a multiply-add per 8. MXFP4 first, FP8 at the end of the file.
 *
 * MXFP4. Why bf16 loses nothing: a quantised activation (an e4m3 value times a power of two, 4
 * significant bits) and a decoded weight (twice an e2m1 value, 2 bits, times a power of two) are exact
 * in bf16, and their product (6 bits) is exact in fp32; vdpbf16ps then sums in fp32 like the AVX2
 * kernel, in another order. So the results differ from the reference's only by the order of fp32 sums,
 * as quant.c's do.
 *
 * The block's scale is folded into the decoded values: a table row per e8m0 byte holds the 16 codes'
 * values already times 2^(e - 128) (an exponent added to each bf16), so a block costs a table row and
 * one permute, and a token row one vdpbf16ps straight into its sum. vdpbf16ps flushes subnormal
 * results (and inputs) to zero, where the reference keeps them: every nonzero product here is at least
 * 2^(e - 159) (activations are multiples of 2^-31: e4m3's 2^-9 step times a scale of at least 2^-22),
 * so the folding is taken only for e in [33, 252] (no product or sum below 2^-126, no decoded value
 * past bf16's range). A weight row with a block of another scale (none in a real checkpoint) takes a
 * loop of its own: such a block's values unscaled, its partial sum times the scale in fp32 as the AVX2
 * kernel does, into a second sum added to the first at the end.
 *
 * Token rows: bf16, in the natural order (element 2j and 2j + 1 of a block in pair j, as the bytes
 * hold them: low nibble, high nibble). A (weight row, token row) sum runs over the blocks in order
 * and ends in one fixed 16-lane reduction (reduce512.h), whatever the blocking: every call shape gives
 * the same bits per row. */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dots.h"
#include "quant.h"

#if V4C_BF16DOT
#include <immintrin.h>

#include "reduce512.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

#define MX_FOLD_LO 33 /* e8m0 bytes whose scale is folded into the decoded values (see above) */
#define MX_FOLD_HI 252
#define RCMAX 6 /* token rows a block holds: 4 x 6 sums, 4 decoded blocks and a token vector in 32 registers */

/* row e: the bf16 bits of 2 x e2m1(code) (times 2^(e - 128) where e is folded), codes 0-15; one spare row
 * so a 64-byte load of row 255 stays inside */
static uint16_t mx_tables[257][16];

__attribute__((constructor)) static void mx_tables_init(void) {
    static const uint16_t twice[16] = {0,      0x3F80, 0x4000, 0x4040, 0x4080, 0x40C0, 0x4100, 0x4140,
                                       0,      0xBF80, 0xC000, 0xC040, 0xC080, 0xC0C0, 0xC100, 0xC140};
    for (int e = 0; e < 257; e++)
        for (int c = 0; c < 16; c++) {
            const int fold = e >= MX_FOLD_LO && e <= MX_FOLD_HI && twice[c];
            mx_tables[e][c] = (uint16_t)(twice[c] + (fold ? (e - 128) * 128 : 0));
        }
}

/* block p's 32 codes as word indices, in pair order: dword j = (low nibble of byte j, high nibble) */
TARGET static inline __attribute__((always_inline)) __m512i mx_codes(const uint8_t *p) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8); /* (a|b)&c */
}

/* whether every block of a weight row (its nb scales) has its scale folded into the table */
static int mx_row_folds(const uint8_t *sc, long nb) {
    int ok = 1;
    for (long b = 0; b < nb; b++) ok &= sc[b] >= MX_FOLD_LO && sc[b] <= MX_FOLD_HI;
    return ok;
}

/* rows w + i * S (i < RW), every block folded, against bf16 token rows x[0 .. RC): y[r * ldy + i * S]. The RW
 * blocks are decoded first, then each token row's vector is loaded once for all of them. */
TARGET static inline __attribute__((always_inline)) void mxb_block(const uint8_t *w, const uint8_t *sc, long S, long K,
                                                                   const uint16_t *const *x, float *y, long ldy,
                                                                   const int RW, const int RC, const int pf) {
    __m512 acc[4][RCMAX];
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) acc[i][r] = _mm512_setzero_ps();
    const long nb = K / 32, kh = K / 2;
    for (long b = 0; b < nb; b++) {
        __m512bh wv[4];
        for (int i = 0; i < RW; i++) {
            const uint8_t *p = w + i * S * kh + 16 * b;
            if (pf && b % 4 == 0) __builtin_prefetch(p + V4C_PF_BYTES, 0, 0);
            wv[i] = (__m512bh)_mm512_permutexvar_epi16(mx_codes(p), _mm512_loadu_si512(mx_tables[sc[i * S * nb + b]]));
        }
        for (int r = 0; r < RC; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[r] + 32 * b);
            for (int i = 0; i < RW; i++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[i], xv);
        }
    }
    __m512 v[4 * RCMAX];
    float sum[4 * RCMAX];
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) v[i * RC + r] = acc[i][r];
    int n = 0;
    for (; n + 8 <= RW * RC; n += 8) v4c_hsum512x8(v + n, sum + n); /* eight at once, the same additions */
    for (; n < RW * RC; n++) sum[n] = v4c_hsum512(v[n]);
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) y[r * ldy + i * S] = sum[i * RC + r];
}

/* one weight row with some block unfolded, against token rows x[0 .. c): y[r * ldy]. Folded blocks as
 * mxb_block sums them; each unfolded one's partial sum times its scale into a second sum, added at the end. */
TARGET static void mxb_row_unfolded(const uint8_t *w, const uint8_t *sc, long K, const uint16_t *const *x, int c,
                                    float *y, long ldy) {
    const long nb = K / 32;
    for (int r = 0; r < c; r++) {
        __m512 acc = _mm512_setzero_ps(), low = _mm512_setzero_ps();
        for (long b = 0; b < nb; b++) {
            const int e = sc[b];
            const __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(mx_codes(w + 16 * b), _mm512_loadu_si512(mx_tables[e]));
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[r] + 32 * b);
            if (e >= MX_FOLD_LO && e <= MX_FOLD_HI)
                acc = _mm512_dpbf16_ps(acc, wv, xv);
            else
                low = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wv, xv), _mm512_set1_ps(MX_HALF.f[e]), low);
        }
        y[r * ldy] = v4c_hsum512(acc) + v4c_hsum512(low);
    }
}

/* rows o .. o + RW (S apart), all folded, against all c token rows, RCMAX at a time */
#define MXB_ROWS(RW)                                                                                      \
    for (int r0 = 0; r0 < c; r0 += RCMAX) {                                                               \
        const uint16_t *const *xr = x + r0;                                                               \
        float *yr = Y + r0 * ldy + o;                                                                     \
        switch (c - r0 < RCMAX ? c - r0 : RCMAX) {                                                        \
        case 1: mxb_block(w, sc, S, K, xr, yr, ldy, RW, 1, pf); break;                                    \
        case 2: mxb_block(w, sc, S, K, xr, yr, ldy, RW, 2, pf); break;                                    \
        case 3: mxb_block(w, sc, S, K, xr, yr, ldy, RW, 3, pf); break;                                    \
        case 4: mxb_block(w, sc, S, K, xr, yr, ldy, RW, 4, pf); break;                                    \
        case 5: mxb_block(w, sc, S, K, xr, yr, ldy, RW, 5, pf); break;                                    \
        default: mxb_block(w, sc, S, K, xr, yr, ldy, RW, RCMAX, pf); break;                               \
        }                                                                                                 \
    }

/* rows o, o + S, o + 2S, o + 3S: as a block of four when all are folded, else one by one */
TARGET static void mxb_rows4(const uint8_t *W, const uint8_t *Sc, long o, long S, long K, const uint16_t *const *x,
                             int c, float *Y, long ldy, int pf) {
    const long kh = K / 2, nb = K / 32;
    int all = 1;
    for (int i = 0; i < 4; i++) all &= mx_row_folds(Sc + (o + i * S) * nb, nb);
    if (__builtin_expect(all, 1)) {
        const uint8_t *w = W + o * kh, *sc = Sc + o * nb;
        MXB_ROWS(4)
        return;
    }
    for (int i = 0; i < 4; i++) {
        const long oi = o + i * S;
        const uint8_t *w = W + oi * kh, *sc = Sc + oi * nb;
        if (mx_row_folds(sc, nb)) {
            const long o = oi;
            MXB_ROWS(1)
        } else {
            mxb_row_unfolded(w, sc, K, x, c, Y + oi, ldy);
        }
    }
}

/* Y[r * ldy + o] = dot(W row o, x[r]) for o < N, r < c. Blocks of four weight rows against up to RCMAX token
 * rows: for one or two token rows (a decode step) the four rows are N / 4 apart, four long streams
 * prefetched non-temporal (as dots_template.h); for more, neighbours, whose blocks stay in L1 while the
 * token rows pass. */
TARGET void v4c_mx_dots_bf16(const uint8_t *W, const uint8_t *Sc, long N, long K, const uint16_t *const *x, int c,
                             float *Y, long ldy) {
    const long kh = K / 2, nb = K / 32;
    const int pf = c <= 2;
    const long S = pf ? N / 4 : 1;
    long o = 0;
    if (pf) {
        for (; o < S; o++) mxb_rows4(W, Sc, o, S, K, x, c, Y, ldy, pf);
        o = 4 * S;
    } else {
        for (; o + 4 <= N; o += 4) mxb_rows4(W, Sc, o, 1, K, x, c, Y, ldy, pf);
    }
    for (; o < N; o++) {
        const uint8_t *w = W + o * kh, *sc = Sc + o * nb;
        if (mx_row_folds(sc, nb)) {
            MXB_ROWS(1)
        } else {
            mxb_row_unfolded(w, sc, K, x, c, Y + o, ldy);
        }
    }
}
#undef MXB_ROWS

/* ---- FP8 e4m3: dots_template.h with weights decoded to bf16 ---------------------------------------
 * quant.c multiplies the token rows by a 128-row block's column-block scales first (exact: powers of
 * two), then runs this kernel over the block's rows. An e4m3 value is exact in bf16 (subnormals
 * included: 2^-9 is a normal bf16), so is a scaled token value (4 significant bits), and their product
 * (8 bits) in fp32. A nonzero scaled token value is at least 2^(e - 158) and a product 2^(e - 167) for a
 * scale byte e (activations are multiples of 2^-31), so quant.c takes this kernel only for row blocks
 * whose scales are all >= FP8_BF16_MIN_SCALE (41), where nothing is subnormal for vdpbf16ps to flush;
 * others keep the AVX2 kernel. */

/* the bf16 bits of e4m3 codes 0-7 (the subnormals M x 2^-9); the other codes are normals, whose bits are
 * the code's shifted under an exponent rebiased by 120 */
static const uint16_t e4m3_sub_bf16[32] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};

/* 32 e4m3 bytes as 32 bf16 values, in order */
TARGET static inline __attribute__((always_inline)) __m512bh e4m3_bf16x32(const uint8_t *p) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i m = _mm512_and_si512(w, _mm512_set1_epi16(0x7F));
    const __m512i nrm = _mm512_add_epi16(_mm512_slli_epi16(m, 4), _mm512_set1_epi16(0x3C00));
    const __m512i v = _mm512_mask_permutexvar_epi16(nrm, _mm512_cmplt_epu16_mask(m, _mm512_set1_epi16(8)), m,
                                                    _mm512_loadu_si512(e4m3_sub_bf16));
    /* v | the sign: (a | (b & c)) */
    return (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_slli_epi16(w, 8), _mm512_set1_epi16((short)0x8000), 0xF8);
}

#define LANES 32
#define VEC __m512
#define ZERO() _mm512_setzero_ps()
#define HSUM(v) v4c_hsum512(v)
#define HSUM8V(v, out) v4c_hsum512x8(v, out)
#define XT uint16_t
#define XV __m512bh
#define XLOAD(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
#define XF(v) bf2f(v)
#define MAC(acc, w, x) _mm512_dpbf16_ps(acc, w, x)
#define NAME v4c_dots_bf16_e4m3
#define WT uint8_t
#define WV __m512bh
#define WLOAD(p) e4m3_bf16x32(p)
#define WF(v) e4m3f(v)
#include "dots_template.h"

int v4c_quant_bf16_supported(void) {
    static int ok = -1; /* asked on every call: the CPU's answer once (threads racing here store the same value) */
    if (ok < 0) {
        __builtin_cpu_init();
        ok = v4c_isa_supported(V4C_ISA_AVX512BF16) && __builtin_cpu_supports("avx512bw");
    }
    return ok;
}

#else /* the compiler knows no AVX512-BF16: no kernels (quant.c keeps its AVX2 ones) */
void v4c_mx_dots_bf16(const uint8_t *W, const uint8_t *Sc, long N, long K, const uint16_t *const *x, int c, float *Y,
                      long ldy) {
    (void)W, (void)Sc, (void)N, (void)K, (void)x, (void)c, (void)Y, (void)ldy;
}
void v4c_dots_bf16_e4m3(const void *W, long N, long K, const void *const *x, int c, float *Y, long ldy) {
    (void)W, (void)N, (void)K, (void)x, (void)c, (void)Y, (void)ldy;
}
int v4c_quant_bf16_supported(void) { return 0; }
#endif
