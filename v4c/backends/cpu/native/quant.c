/* A decode step's products with the release's quantised weights, read as stored: MXFP4 routed
 * experts (e2m1 pairs in a byte, one e8m0 scale per 32 values along K) and FP8 e4m3 matrices with
 * 128 x 128 block scales (attention projections, shared experts), decoded in registers while the
 * weights stream (AVX2 + FMA; the same kernels run on AVX-512 CPUs).
 *
 * The products are the reference's (v4c/graph/weights.py `linear`): each token row is quantised to
 * e4m3 per 1 x 128 block with a power-of-two scale (`act_quant`, the official act_quant's rule: amax
 * floored at 1e-4, the smallest power of two >= amax / 448, round to nearest even), multiplied by
 * the weight's exact decoded values, summed in fp32. Every product of a quantised activation (4
 * significant bits) and a decoded weight (2 for e2m1, 4 for e4m3) times powers of two is exact in
 * fp32, and a block's partial sum times its power-of-two scale is exact too, so the results differ
 * from the reference's only by the order of the fp32 sums.
 *
 * On AVX512-BF16 CPUs quant_bf16.c's kernels take both formats' products (weights decoded to bf16,
 * multiplied in pairs); below, the AVX2 ones.
 *
 * MXFP4 (`mx_dots`): 16 bytes hold a 32-value block, element 2j in byte j's low nibble and 2j + 1 in
 * its high one. The token rows are permuted once per call to match (each 32-block's even elements,
 * then its odd ones), so a block decodes with two table lookups (pshufb: a nibble to twice its e2m1
 * value, a small integer), four widenings to fp32, four multiply-adds per token row into a block sum,
 * and one multiply-add of that sum by the block's scale (halved: the table holds twice the value).
 *
 * FP8 (`fp8_rows`): within a 128-row block every row shares the scale of each 128-column block, so
 * the token rows are multiplied by those scales once per row block (exact: powers of two) and the
 * dot-product template of dots.c (dots_template.h) runs with e4m3 weights, decoded by placing the
 * 7 value bits under an fp32 exponent and multiplying by 2^120 (exact, subnormals included).
 *
 * `v4c_qlinear` is a dense product (`linear`, the fused projections' and the output projection's
 * grouped one); `v4c_moe_decode_q` the routed experts (and the shared expert, quantised or plain fp32 /
 * bf16 / fp16, the activations' dtype) of a decode step, in the three passes of moe.c over PyTorch's
 * OpenMP team, plus one between the first two that quantises the activations of every quantised down
 * projection.
 * Roundings for bf16 (fp16) activations follow moe.c (each product and activation step rounded to bf16 as
 * the reference's ops round them; the weighted sum in fp32, rounded once).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dots.h"
#include "moe_common.h"
#include "quant.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define V4C_QX86 1
#include <immintrin.h>
#else
#define V4C_QX86 0
#endif

/* weight formats (the `fmt` codes of the entry points) */
enum { QF_F32 = 0, QF_BF16 = 1, QF_FP8 = 2, QF_MXFP4 = 3, QF_F16 = 4 };

/* the plain format of activations of dtype dt (0 fp32, 1 bf16, 2 fp16); whether a format is a plain one */
static int plain_fmt(int dt) { return dt == 2 ? QF_F16 : dt == 1 ? QF_BF16 : QF_F32; }
static int is_plain(int fmt) { return fmt == QF_F32 || fmt == QF_BF16 || fmt == QF_F16; }

/* ---- activations: e4m3 per 1 x 128 block, as weights.py `_quantised_act` ------------------- */

#define ACT_BLOCK 128

/* the smallest power of two s >= amax / 448, amax floored at 1e-4 (quant.py `_pow2_scale`) */
static float act_scale(float amax) {
    if (!(amax >= 1e-4f)) amax = 1e-4f;
    int ex;
    const double m = frexp((double)amax / 448.0, &ex);
    int e = m == 0.5 ? ex - 1 : ex;
    e = e < -127 ? -127 : (e > 127 ? 127 : e);
    if ((double)amax > 448.0 * ldexp(1.0, e) && e < 127) e++;
    if ((double)amax <= 448.0 * ldexp(1.0, e - 1) && e > -127) e--;
    return ldexpf(1.0f, e);
}

/* v (|v| <= 448) rounded to the e4m3 grid, to nearest even: 3 mantissa bits, or a multiple of 2^-9
 * below 2^-6 (the subnormals) */
static inline float e4m3_rne(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint32_t rn = (u + 0x7FFFFu + ((u >> 20) & 1u)) & 0xFFF00000u;
    float n;
    memcpy(&n, &rn, 4);
    const float s = (v + 24576.0f) - 24576.0f; /* 1.5 * 2^14: one ulp is 2^-9 */
    return (u & 0x7FFFFFFFu) < 0x3C800000u ? s : n;
}

/* where element k of a row goes in the MXFP4 kernels' order (each 32-block: evens, then odds) */
static inline long mx_pos(long k) { return (k & ~31L) + ((k & 1) << 4) + ((k & 31) >> 1); }

/* The token-row forms the kernels read (`act_quant`'s `form`): the e4m3 values times their block scales as
 * fp32 (plain), the same in the AVX2 MXFP4 kernel's order (K a multiple of 32), or as bf16 bits in the
 * natural order (the AVX512-BF16 MXFP4 kernel; exact: 4 significant bits). */
enum { ROW_F32 = 0, ROW_MX_F32 = 1, ROW_BF16 = 2 };

/* the form a matrix of format fmt reads its quantised token rows in (bf: quant_bf16.c's kernels) */
static int row_form(int fmt, int bf) { return fmt != QF_MXFP4 ? ROW_F32 : bf ? ROW_BF16 : ROW_MX_F32; }

/* out = row x [K] quantised, in form `form` (ROW_BF16: out holds K uint16) */
V4C_CLONES static void act_quant(const float *x, long K, float *out, int form) {
    float q[ACT_BLOCK];
    for (long k0 = 0; k0 < K; k0 += ACT_BLOCK) {
        const long n = K - k0 < ACT_BLOCK ? K - k0 : ACT_BLOCK;
        float amax = 0.0f;
        for (long i = 0; i < n; i++) {
            const float a = fabsf(x[k0 + i]);
            amax = a > amax ? a : amax;
        }
        const float s = act_scale(amax), inv = 1.0f / s;
        for (long i = 0; i < n; i++) q[i] = e4m3_rne(x[k0 + i] * inv) * s;
        if (form == ROW_MX_F32)
            for (long i = 0; i < n; i++) out[mx_pos(k0 + i)] = q[i];
        else if (form == ROW_BF16)
            for (long i = 0; i < n; i++) ((uint16_t *)out)[k0 + i] = f2bf(q[i]);
        else
            memcpy(out + k0, q, n * sizeof(float));
    }
}

#if V4C_QX86

/* ---- MXFP4 kernel (AVX2 + FMA) ------------------------------------------------------------ */
#define QTARGET __attribute__((target("avx2,fma")))

QTARGET static inline __attribute__((always_inline)) float qhsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* a 32-value block at p as 4 x 8 fp32 lanes of twice its e2m1 values: the even elements, then the odd */
QTARGET static inline __attribute__((always_inline)) void mx_decode(const uint8_t *p, __m256 *w) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, low));
    const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), low));
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
}

/* rows w + i * S (i < RW; data rows of K / 2 bytes, scale rows of K / 32) against token rows x[0 .. RC)
 * (permuted): y[r * ldy + i * S] */
QTARGET static inline __attribute__((always_inline)) void mx_block(const uint8_t *w, const uint8_t *sc, long S,
                                                                   long K, const float *const *x, float *y,
                                                                   long ldy, const int RW, const int RC,
                                                                   const int pf) {
    __m256 acc[4][8];
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) acc[i][r] = _mm256_setzero_ps();
    const long nb = K / 32, kh = K / 2;
    for (long b = 0; b < nb; b++) {
        for (int i = 0; i < RW; i++) {
            __m256 wv[4];
            if (pf && b % 4 == 0) __builtin_prefetch(w + i * S * kh + 16 * b + V4C_PF_BYTES, 0, 0);
            mx_decode(w + i * S * kh + 16 * b, wv);
            const __m256 s = _mm256_broadcast_ss(&MX_HALF.f[sc[i * S * nb + b]]);
            for (int r = 0; r < RC; r++) {
                const float *xb = x[r] + 32 * b;
                __m256 t = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xb));
                t = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xb + 8), t);
                t = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xb + 16), t);
                t = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xb + 24), t);
                acc[i][r] = _mm256_fmadd_ps(t, s, acc[i][r]);
            }
        }
    }
    for (int i = 0; i < RW; i++)
        for (int r = 0; r < RC; r++) y[r * ldy + i * S] = qhsum(acc[i][r]);
}

#define MX_ROWS(RW, RC)                                                                       \
    for (int r0 = 0; r0 < c; r0 += (RC)) {                                                    \
        if (c - r0 >= (RC))                                                                   \
            mx_block(w, sc, S, K, x + r0, Y + r0 * ldy + o, ldy, RW, RC, 1);                  \
        else                                                                                  \
            mx_block(w, sc, S, K, x + r0, Y + r0 * ldy + o, ldy, RW, 1, 1);                   \
    }

/* one weight row against token rows in chunks of up to eight (each block decoded once per chunk) */
#define MX_WIDE()                                                                             \
    for (int r0 = 0; r0 < c; r0 += 8) {                                                       \
        const float *const *xr = x + r0;                                                      \
        float *yr = Y + r0 * ldy + o;                                                         \
        switch (c - r0 < 8 ? c - r0 : 8) {                                                    \
        case 1: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 1, 0); break;                           \
        case 2: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 2, 0); break;                           \
        case 3: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 3, 0); break;                           \
        case 4: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 4, 0); break;                           \
        case 5: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 5, 0); break;                           \
        case 6: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 6, 0); break;                           \
        case 7: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 7, 0); break;                           \
        default: mx_block(w, sc, 1, K, xr, yr, ldy, 1, 8, 0); break;                          \
        }                                                                                     \
    }

/* Y[r * ldy + o] = dot(W row o, x[r]) for o < N, r < c: W [N, K] MXFP4 (data [N, K/2], scale [N, K/32]),
 * K a multiple of 32, token rows fp32 in the permuted order. One token row: weight rows in blocks of
 * four, S = N / 4 apart (four long sequential streams, as dots_template.h); two: blocks of two rows
 * against both (both: each weight read once, prefetched non-temporal as there); more: one row at a
 * time against up to eight token rows, so a block's decoding (most of the work) is shared by eight
 * rows' multiply-adds. */
QTARGET static void mx_dots(const uint8_t *W, const uint8_t *Sc, long N, long K, const float *const *x, int c,
                            float *Y, long ldy) {
    const long kh = K / 2, nb = K / 32;
    if (c > 2) {
        for (long o = 0; o < N; o++) {
            const uint8_t *w = W + o * kh, *sc = Sc + o * nb;
            MX_WIDE()
        }
        return;
    }
    const long rw = c == 1 ? 4 : 2;
    long S = N / rw;
    for (long o = 0; o < S; o++) {
        const uint8_t *w = W + o * kh, *sc = Sc + o * nb;
        if (rw == 4) {
            MX_ROWS(4, 1)
        } else {
            MX_ROWS(2, 2)
        }
    }
    S = 1;
    for (long o = rw * (N / rw); o < N; o++) {
        const uint8_t *w = W + o * kh, *sc = Sc + o * nb;
        MX_ROWS(1, 1)
    }
}
#undef MX_ROWS
#undef MX_WIDE

/* ---- FP8 kernel: dots_template.h with e4m3 weights (AVX2 + FMA) ----------------------------- */
#define TARGET QTARGET
#define LANES 8
#define VEC __m256
#define ZERO() _mm256_setzero_ps()
#define HSUM(v) qhsum(v)
#define XT float
#define XV __m256
#define XLOAD(p) _mm256_loadu_ps(p)
#define XF(v) (v)
#define MAC(acc, w, x) _mm256_fmadd_ps(w, x, acc)
#define NAME dots_avx2_e4m3
#define WT uint8_t
#define WV __m256
#define WLOAD(p)                                                                                          \
    _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(                                                   \
                      _mm256_slli_epi32(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))), 20), \
                      _mm256_set1_epi32((int)0x87F00000u))),                                              \
                  _mm256_set1_ps(0x1p120f))
#define WF(v) e4m3f(v)
#include "dots_template.h"
#undef TARGET
#undef LANES
#undef VEC
#undef ZERO
#undef HSUM
#undef XT
#undef XV
#undef XLOAD
#undef XF
#undef MAC

static int q_available(void) { return v4c_isa_supported(V4C_ISA_AVX2); }

#else /* no x86: no kernels (the op reports it; the PyTorch path runs) */
static void mx_dots(const uint8_t *W, const uint8_t *Sc, long N, long K, const float *const *x, int c, float *Y,
                    long ldy) {
    (void)W, (void)Sc, (void)N, (void)K, (void)x, (void)c, (void)Y, (void)ldy;
}
static void dots_avx2_e4m3(const void *W, long N, long K, const void *const *x, int c, float *Y, long ldy) {
    (void)W, (void)N, (void)K, (void)x, (void)c, (void)Y, (void)ldy;
}
static int q_available(void) { return 0; }
#endif

/* whether this CPU runs the quantised kernels (AVX2 + FMA) */
int v4c_quant_supported(void) { return q_available(); }

/* whether this CPU runs the quantised products in instruction set `isa` (dots.h's codes): AVX2 (+ FMA), or
 * AVX512-BF16 (quant_bf16.c's kernels, for MXFP4 and for FP8 row blocks of ordinary scales) */
int v4c_quant_isa_supported(int isa) {
    if (isa == V4C_ISA_AVX2) return q_available();
    if (isa == V4C_ISA_AVX512BF16) return q_available() && v4c_quant_bf16_supported();
    return 0;
}

/* whether a call asking for `isa` (<= 0: the best this CPU has) takes quant_bf16.c's kernels */
static int bf16_for(int isa) {
    return isa == V4C_ISA_AVX512BF16 || (isa <= 0 && v4c_quant_isa_supported(V4C_ISA_AVX512BF16));
}

/* ---- one matrix, any format --------------------------------------------------------------- */

struct qmat {
    int fmt;               /* QF_* */
    const char *data;      /* the matrix's first row (row0 counts from here) */
    const uint8_t *scale;  /* its scales: [N, K/32] (MXFP4), [ceil(N/128), ceil(K/128)] (FP8) */
    long K, row0;          /* input width; this view's first row within the matrix */
};

/* the fp32-row kernels for plain fp32 / bf16 / fp16 weights (AVX-512F where there is one, else AVX2) */
static v4c_dots_fn plain_kernel(int fmt) {
    const int wdt = fmt == QF_F16 ? 2 : fmt == QF_BF16 ? 1 : 0;
    int xb;
    v4c_dots_fn f = v4c_isa_supported(V4C_ISA_AVX512F) ? v4c_dots_kernel(V4C_ISA_AVX512F, wdt, &xb) : 0;
    return f ? f : v4c_dots_kernel(V4C_ISA_AVX2, wdt, &xb);
}

/* Y[r * ldy + i] for rows i in [i0, i1) of view m against token rows x[0 .. c): rows as the format
 * wants them (plain: as given; FP8: quantised; MXFP4: quantised, and permuted or, with `bf`, bf16 for
 * quant_bf16.c's kernel). `xs` (c * K floats) and `xp` (c pointers): the FP8 rows' scaled copies (bf16 for
 * quant_bf16.c's FP8 kernel, which `bf` allows). */
static void qmat_rows(const struct qmat *m, long i0, long i1, const float *const *x, int c, float *Y, long ldy,
                      float *xs, const float **xp, int bf) {
    if (i0 >= i1) return;
    const long K = m->K, a0 = m->row0 + i0, a1 = m->row0 + i1;
    switch (m->fmt) {
    case QF_F32:
    case QF_BF16:
    case QF_F16:
        plain_kernel(m->fmt)(m->data + a0 * K * (m->fmt == QF_F32 ? 4 : 2), i1 - i0, K, (const void *const *)x, c,
                             Y + i0, ldy);
        break;
    case QF_MXFP4:
        if (bf)
            v4c_mx_dots_bf16((const uint8_t *)m->data + a0 * (K / 2), m->scale + a0 * (K / 32), i1 - i0, K,
                             (const uint16_t *const *)x, c, Y + i0, ldy);
        else
            mx_dots((const uint8_t *)m->data + a0 * (K / 2), m->scale + a0 * (K / 32), i1 - i0, K, x, c, Y + i0, ldy);
        break;
    case QF_FP8: {
        const long kb = (K + 127) / 128;
        for (long a = a0; a < a1;) {
            const long rb = a / 128, e = a1 < (rb + 1) * 128 ? a1 : (rb + 1) * 128;
            const uint8_t *s = m->scale + rb * kb;
            int b16 = bf; /* this row block through quant_bf16.c's kernel: bf16 scaled rows */
            for (long b = 0; b < kb && b16; b++) b16 = s[b] >= FP8_BF16_MIN_SCALE;
            for (int r = 0; r < c; r++) {
                float *o = xs + (long)r * K;
                for (long b = 0; b < kb; b++) {
                    const float f = e8m0f(s[b]);
                    const long k1 = (b + 1) * 128 < K ? (b + 1) * 128 : K;
                    if (b16)
                        for (long k = b * 128; k < k1; k++) ((uint16_t *)o)[k] = f2bf(x[r][k] * f);
                    else
                        for (long k = b * 128; k < k1; k++) o[k] = x[r][k] * f;
                }
                xp[r] = o;
            }
            (b16 ? v4c_dots_bf16_e4m3 : dots_avx2_e4m3)(m->data + a * K, e - a, K, (const void *const *)xp, c,
                                                        Y + (a - m->row0), ldy);
            a = e;
        }
        break;
    }
    }
}



static int xform(int fmt) { return fmt == QF_FP8 ? 1 : (fmt == QF_MXFP4 ? 2 : 0); } /* which token rows */

/* ---- dense products ----------------------------------------------------------------------- */

struct qlin_job {
    int t, dt, fmt, bf;
    long R, K, N;
    const char *w;
    const uint8_t *scale;
    const float **xrows; /* [G, t]: group g's token rows, quantised (and permuted for MXFP4) */
    float *y;            /* [t, N] fp32 */
    void *out;
    float *xs;           /* per thread: t * K floats, then t pointers */
    long xs_stride;      /* floats per thread */
};

static void qlin_rows(void *p, long a, long e, int tid) {
    const struct qlin_job *j = (const struct qlin_job *)p;
    float *xs = j->xs + tid * j->xs_stride;
    const float **xp = (const float **)(xs + align64(sizeof(float) * j->t * j->K) / sizeof(float));
    const struct qmat m = {j->fmt, j->w, j->scale, j->K, 0};
    for (long g = a / j->R; g * j->R < e; g++) {
        const long o0 = a > g * j->R ? a : g * j->R, o1 = e < (g + 1) * j->R ? e : (g + 1) * j->R;
        qmat_rows(&m, o0, o1, j->xrows + g * j->t, j->t, j->y, j->N, xs, xp, j->bf);
        for (int r = 0; r < j->t; r++) {
            const float *y = j->y + r * j->N;
            store_from((char *)j->out + (r * j->N + o0) * (j->dt ? 2 : 4), j->dt, y + o0, o1 - o0);
        }
    }
}

static long qlin_thread_floats(int t, long K) {
    return (align64(sizeof(float) * t * K) + align64(sizeof(void *) * t)) / sizeof(float);
}

/* bytes of scratch `v4c_qlinear` needs */
long v4c_qlinear_work(int threads, int t, int G, long K, long N) {
    const long rows = (long)t * G;
    return 64 + align64(sizeof(void *) * rows) + 2 * align64(sizeof(float) * rows * K) +
           align64(sizeof(float) * (long)t * N) + (long)(threads < 1 ? 1 : threads) * qlin_thread_floats(t, K) * 4;
}

/* out [t, G * R] = per group g: quant(x[:, g, :]) [t, K] . W[g * R : (g + 1) * R] [R, K]^T, W of format
 * `fmt` (QF_FP8: data e4m3 [G * R, K], scale [ceil(G R / 128), ceil(K / 128)]; QF_MXFP4: data [G * R, K/2],
 * scale [G * R, K / 32], K a multiple of 32); x and out of dtype dt (0 fp32, 1 bf16, 2 fp16), x [t, G, K];
 * `isa`: the kernels' instruction set (v4c_quant_isa_supported; <= 0: the best).
 * Returns 0, -1 for bad sizes or format, -3 when this CPU has no kernel. */
int v4c_qlinear(int threads, int isa, int fmt, int dt, int t, int G, long R, long K, const void *x, const void *W,
                const uint8_t *S, void *out, void *work) {
    if (t < 1 || G < 1 || R < 1 || K < 1 || (fmt != QF_FP8 && fmt != QF_MXFP4) || (fmt == QF_MXFP4 && K % 32))
        return -1;
    if (!q_available() || (isa > 0 && !v4c_quant_isa_supported(isa))) return -3;
    const int bf = bf16_for(isa);
    if (threads < 1) threads = 1;
    const long rows = (long)t * G, N = (long)G * R;
    char *p = (char *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    const float **xrows = take(&p, sizeof(void *) * rows);
    float *x32 = take(&p, sizeof(float) * rows * K), *xq = take(&p, sizeof(float) * rows * K);
    float *y = take(&p, sizeof(float) * (long)t * N), *xs = (float *)p;
    const float *xin = (const float *)x;
    if (dt) {
        widen(x, dt, rows * K, x32);
        xin = x32;
    }
    for (long r = 0; r < rows; r++)
        act_quant(xin + r * K, K, xq + r * K, row_form(fmt, bf));
    for (int g = 0; g < G; g++)
        for (int r = 0; r < t; r++) xrows[(long)g * t + r] = xq + ((long)r * G + g) * K;
    struct qlin_job j = {t, dt, fmt, bf, R, K, N, (const char *)W, S, xrows, y, out, xs, qlin_thread_floats(t, K)};
    const long bpr = fmt == QF_FP8 ? K : K / 2 + K / 32; /* bytes per weight row */
    v4c_parallel_rows(N, threads, (65536 + bpr - 1) / bpr, qlin_rows, &j);
    return 0;
}

/* ---- MoE ---------------------------------------------------------------------------------- */

struct qitem {   /* one expert hit (or the shared expert) and its token rows */
    long row;    /* its first row of the per-row buffers: assignments first, then the shared rows */
    int c;       /* token rows */
    int inner;   /* inner width */
    struct qmat gate, up, down;
};

struct qmoe_job {
    int t, D, dt, nitems, Imax, shared, bf;
    long n, lo, k;
    const int64_t *perm;
    const float *w;
    const struct qitem *items;
    const struct qitem **ritem;  /* per row: its item */
    const long *start1, *start2;
    float limit;
    const float **xr[3];         /* per row: its token's input as plain fp32, quantised, the MXFP4 kernel's form */
    const float **ar;            /* per row: its activations as its down projection reads them */
    float *G, *U, *A, *Aq, *Y, *acc;
    void *out;
    float *xs;                   /* per thread: the FP8 rows' scaled token rows, then their pointers */
    long xs_stride, xs_k;
};



static void scratch_of(const struct qmoe_job *j, int tid, float **xs, const float ***xp) {
    *xs = j->xs + tid * j->xs_stride;
    *xp = (const float **)(*xs + align64(sizeof(float) * j->t * j->xs_k) / sizeof(float));
}

/* pass 1: gate and up rows [i0, i1) of each item in [a, e), then their activations */
static void q_up_rows(void *p, long a, long e, int tid) {
    const struct qmoe_job *j = (const struct qmoe_job *)p;
    const long ld = j->Imax;
    float *xs;
    const float **xp;
    scratch_of(j, tid, &xs, &xp);
    for (long it = first_item(j->start1, j->nitems, a); it < j->nitems && j->start1[it] < e; it++) {
        const struct qitem *m = &j->items[it];
        const long i0 = clampl(a - j->start1[it], 0, m->inner), i1 = clampl(e - j->start1[it], 0, m->inner);
        if (i0 >= i1) continue;
        float *G = j->G + m->row * ld, *U = j->U + m->row * ld;
        const float *const *x = j->xr[xform(m->gate.fmt)] + m->row;
        qmat_rows(&m->gate, i0, i1, x, m->c, G, ld, xs, xp, j->bf);
        qmat_rows(&m->up, i0, i1, x, m->c, U, ld, xs, xp, j->bf);
        for (int r = 0; r < m->c; r++)
            moe_swiglu(G + r * ld + i0, U + r * ld + i0, i1 - i0, j->limit, j->dt, j->A + (m->row + r) * ld + i0, 0);
    }
}

/* between the passes: the activations of rows [a, e) quantised where their down projection is */
static void q_act_rows(void *p, long a, long e, int tid) {
    (void)tid;
    const struct qmoe_job *j = (const struct qmoe_job *)p;
    for (long r = a; r < e; r++) {
        const struct qitem *m = j->ritem[r];
        if (m->down.fmt == QF_FP8 || m->down.fmt == QF_MXFP4)
            act_quant(j->A + r * j->Imax, m->inner, j->Aq + r * j->Imax, row_form(m->down.fmt, j->bf));
    }
}

/* pass 2: down rows of each item in [a, e); an item's span is D rows of `inner` units each */
static void q_down_rows(void *p, long a, long e, int tid) {
    const struct qmoe_job *j = (const struct qmoe_job *)p;
    const long D = j->D;
    float *xs;
    const float **xp;
    scratch_of(j, tid, &xs, &xp);
    for (long it = first_item(j->start2, j->nitems, a); it < j->nitems && j->start2[it] < e; it++) {
        const struct qitem *m = &j->items[it];
        const long s = j->start2[it], in = m->inner; /* row o belongs to the range holding s + o * in */
        const long o0 = clampl((a - s + in - 1) / in, 0, D), o1 = clampl((e - s + in - 1) / in, 0, D);
        if (o0 >= o1) continue;
        float *Y = j->Y + m->row * D;
        qmat_rows(&m->down, o0, o1, j->ar + m->row, m->c, Y, D, xs, xp, j->bf);
        moe_round_cols(Y, m->c, D, o0, o1, j->dt);
    }
}

/* pass 3: columns [d0, d1) of every token's weighted sum, assignments in their order */
static void q_combine(void *p, long d0, long d1, int tid) {
    (void)tid;
    const struct qmoe_job *j = (const struct qmoe_job *)p;
    moe_weighted_sum(j->t, j->D, j->shared, j->n, j->lo, j->k, j->perm, j->w, j->Y, j->acc, j->dt, j->out, d0, d1);
}

static long qmoe_thread_floats(int t, long Kmax) {
    return (align64(sizeof(float) * t * Kmax) + align64(sizeof(void *) * t)) / sizeof(float);
}

/* bytes of scratch `v4c_moe_decode_q` needs (`work`) for these sizes */
long v4c_moe_decode_q_work(int threads, int t, int D, int I, int Is, int k, int E) {
    const long rows = (long)t * k + t, Imax = I > Is ? I : Is, Kmax = D > Imax ? D : Imax;
    return 64 + align64(sizeof(struct qitem) * (E + 1L)) + 2 * align64(sizeof(long) * (E + 2L)) +
           5 * align64(sizeof(void *) * rows) + 4 * align64(sizeof(float) * rows * Imax) +
           align64(sizeof(float) * rows * D) + 4 * align64(sizeof(float) * (long)t * D) +
           (long)(threads < 1 ? 1 : threads) * qmoe_thread_floats(t, Kmax) * 4;
}

static long fmt_bytes_x2(int fmt) { return fmt == QF_MXFP4 ? 1 : (fmt == QF_FP8 ? 2 : (fmt == QF_F32 ? 8 : 4)); }

/* out [t, D] = sum over the assignments a in [offsets[0], offsets[E]) of w[perm[a]] *
 * expert_e(x[perm[a] / k]) for the expert e whose range holds a, plus the shared expert's output
 * when sg is given (as moe.c's v4c_moe_decode). Routed weights of format `fmt` (QF_MXFP4: w13 data
 * [E, 2I, D/2], scale [E, 2I, D/32]; w2 [E, D, I/2], [E, D, I/32]; QF_FP8: w13 [E, 2I, D], scale
 * [E, ceil(2I/128), ceil(D/128)]; w2 [E, D, I], [E, ceil(D/128), ceil(I/128)]); the shared expert's
 * of format `sfmt` (plain: QF_F32 / QF_BF16 / QF_F16, the activations' dtype; or quantised, scales as above
 * for one matrix). x and out of dtype dt; `isa` as v4c_qlinear's. Returns 0, -1 for bad sizes or formats, -3
 * when this CPU has no kernel. */
int v4c_moe_decode_q(int threads, int isa, int dt, int t, int D, int I, int Is, int k, int E, const void *x,
                     const int64_t *offsets, const int64_t *perm, const float *w, int fmt, const void *w13,
                     const uint8_t *w13s, const void *w2, const uint8_t *w2s, int sfmt, const void *sg,
                     const uint8_t *sgs, const void *su, const uint8_t *sus, const void *sd, const uint8_t *sds,
                     float limit, void *out, void *work) {
    if (t < 1 || D < 1 || I < 1 || (sg && Is < 1) || k < 1 || E < 1) return -1;
    if (fmt != QF_FP8 && fmt != QF_MXFP4) return -1;
    if (fmt == QF_MXFP4 && (D % 32 || I % 32)) return -1;
    if (sg && (sfmt < 0 || sfmt > QF_F16 || (is_plain(sfmt) && sfmt != plain_fmt(dt)) ||
               (sfmt == QF_MXFP4 && (D % 32 || Is % 32))))
        return -1;
    for (int e = 0; e < E; e++)
        if (offsets[e + 1] < offsets[e]) return -1;
    if (!q_available() || (isa > 0 && !v4c_quant_isa_supported(isa))) return -3;
    if (threads < 1) threads = 1;
    const int bf = bf16_for(isa);
    const long lo = offsets[0], n = offsets[E] - lo, rows = n + (sg ? t : 0);
    const int Imax = I > Is ? I : Is;
    const long Kmax = D > Imax ? D : Imax;
    char *p = (char *)(((uintptr_t)work + 63) & ~(uintptr_t)63); /* (the pieces v4c_moe_decode_q_work counts) */
    struct qitem *items = take(&p, sizeof(struct qitem) * (E + 1L));
    long *start1 = take(&p, sizeof(long) * (E + 2L)), *start2 = take(&p, sizeof(long) * (E + 2L));
    const struct qitem **ritem = take(&p, sizeof(void *) * rows);
    const float **xr0 = take(&p, sizeof(void *) * rows), **xr1 = take(&p, sizeof(void *) * rows);
    const float **xr2 = take(&p, sizeof(void *) * rows), **ar = take(&p, sizeof(void *) * rows);
    float *G = take(&p, sizeof(float) * rows * Imax), *U = take(&p, sizeof(float) * rows * Imax);
    float *A = take(&p, sizeof(float) * rows * Imax), *Aq = take(&p, sizeof(float) * rows * Imax);
    float *Y = take(&p, sizeof(float) * rows * D), *acc = take(&p, sizeof(float) * (long)t * D);
    float *x32 = take(&p, sizeof(float) * (long)t * D), *xq = take(&p, sizeof(float) * (long)t * D);
    float *xqp = take(&p, sizeof(float) * (long)t * D), *xs = (float *)p;
    /* the token rows in each form a matrix reads: fp32, quantised, quantised and permuted (MXFP4) */
    const float *xin = (const float *)x;
    if (dt) {
        widen(x, dt, (long)t * D, x32);
        xin = x32;
    }
    const int any_mx = fmt == QF_MXFP4 || (sg && sfmt == QF_MXFP4), any_fp8 = fmt == QF_FP8 || (sg && sfmt == QF_FP8);
    for (int r = 0; r < t; r++) {
        if (any_fp8) act_quant(xin + (long)r * D, D, xq + (long)r * D, ROW_F32);
        if (any_mx) act_quant(xin + (long)r * D, D, xqp + (long)r * D, row_form(QF_MXFP4, bf));
    }
    int nitems = 0;
    if (sg) {
        const struct qmat g = {sfmt, (const char *)sg, sgs, D, 0}, u = {sfmt, (const char *)su, sus, D, 0},
                          d = {sfmt, (const char *)sd, sds, Is, 0};
        items[nitems++] = (struct qitem){n, t, Is, g, u, d};
        for (int r = 0; r < t; r++) {
            xr0[n + r] = xin + (long)r * D;
            xr1[n + r] = xq + (long)r * D;
            xr2[n + r] = xqp + (long)r * D;
        }
    }
    const long e13 = (long)2 * I * D * fmt_bytes_x2(fmt) / 2, e2 = (long)D * I * fmt_bytes_x2(fmt) / 2;
    const long s13 = fmt == QF_MXFP4 ? (long)2 * I * (D / 32) : ((2L * I + 127) / 128) * ((D + 127) / 128);
    const long s2 = fmt == QF_MXFP4 ? (long)D * (I / 32) : ((D + 127L) / 128) * ((I + 127) / 128);
    for (int e = 0; e < E; e++) {
        const long a = offsets[e] - lo, c = offsets[e + 1] - offsets[e];
        if (!c) continue;
        const char *g = (const char *)w13 + e * e13;
        const struct qmat mg = {fmt, g, w13s + e * s13, D, 0}, mu = {fmt, g, w13s + e * s13, D, I},
                          md = {fmt, (const char *)w2 + e * e2, w2s + e * s2, I, 0};
        items[nitems++] = (struct qitem){a, (int)c, I, mg, mu, md};
        for (long r = 0; r < c; r++) {
            const long tok = perm[lo + a + r] / k;
            xr0[a + r] = xin + tok * D;
            xr1[a + r] = xq + tok * D;
            xr2[a + r] = xqp + tok * D;
        }
    }
    for (int i = 0; i < nitems; i++)
        for (int r = 0; r < items[i].c; r++) {
            const long row = items[i].row + r;
            const int qd = items[i].down.fmt == QF_FP8 || items[i].down.fmt == QF_MXFP4;
            ritem[row] = &items[i];
            ar[row] = (qd ? Aq : A) + row * Imax;
        }
    start1[0] = start2[0] = 0;
    for (int i = 0; i < nitems; i++) {
        start1[i + 1] = start1[i] + items[i].inner;
        start2[i + 1] = start2[i] + (long)D * items[i].inner;
    }
    struct qmoe_job j = {t, D, dt, nitems, Imax, sg != 0, bf, n, lo, k, perm, w, items, ritem, start1, start2, limit,
                         {xr0, xr1, xr2}, ar, G, U, A, Aq, Y, acc, out, xs, qmoe_thread_floats(t, Kmax), Kmax};
    /* each thread's share at least 32 KiB of weights in pass 1 (units: a gate and an up row), 64 KiB in
     * pass 2 (units: one weight), rows x widths of 8K values in the activations' quantisation, 16K
     * multiply-adds of the sums (pass 3) */
    if (nitems) {
        const long unit1 = D * fmt_bytes_x2(fmt); /* a gate and an up row, bytes */
        v4c_parallel_rows(start1[nitems], threads, (32768 + unit1 - 1) / unit1, q_up_rows, &j);
        v4c_parallel_rows(rows, threads, 8192 / Imax + 1, q_act_rows, &j);
        v4c_parallel_rows(start2[nitems], threads, 2 * 65536 / fmt_bytes_x2(fmt), q_down_rows, &j);
    }
    v4c_parallel_rows(D, threads, 16384 / (rows + 1) + 1, q_combine, &j);
    return 0;
}
