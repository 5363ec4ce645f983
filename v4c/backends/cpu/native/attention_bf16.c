/* Attention's two products and the indexer's scores over bf16 caches on AVX512-BF16 CPUs (called by
 * attention.c and indexer.c): vdpbf16ps multiplies bf16 pairs exactly and sums them in fp32, at twice
 * the rate of the fp32 paths, which widen every key first.
 *  - scores: the heads in the 16 lanes (the query packed once as [D/2][16] pairs of dims), each
 *    key's pair of dims broadcast from where the key lies: no key copied, no sums across lanes,
 *    eight keys in flight.
 *  - values: head dims in the lanes; each two keys' rows interleaved into pairs (one pass over
 *    them) and each head's two probabilities rounded to a bf16 pair, as transformers' eager
 *    attention rounds its probabilities to the query's dtype before the product with V.
 *  - the indexer's scores: as attention's (16 heads a block), then relu, times each head's weight
 *    and summed over the heads, per key.
 * A query's sums run in an order fixed by its own key list alone, so its result does not depend on
 * the other rows of the call (batch invariance). */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dots.h"

static long packed_words(int H, long D) { return (H + 15) / 16 * (D / 2) * 16L; } /* pack_heads' output */

long v4c_index_bf16_work(int H, long D) { return 4 * packed_words(H, D); }

long v4c_attn_bf16_work(long n, int H, long D) {
    const long pairs = (n + 1) / 2; /* the packed query, the probability pairs, the interleaved keys */
    return 4 * (packed_words(H, D) + pairs * (long)H + pairs * D);
}

#if V4C_BF16DOT
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512bf16")))

static inline uint32_t pair_at(const void *row, long i) { /* dims 2i, 2i + 1 of a bf16 row */
    uint32_t u;
    memcpy(&u, (const char *)row + 4 * i, 4);
    return u;
}

#define BCAST(u) ((__m512bh)_mm512_set1_epi32((int)(u)))

/* qp [(H + 15) / 16 blocks][D / 2][16 lanes]: head h's dims 2i, 2i + 1 at block h / 16, lane h % 16 */
static void pack_heads(const uint16_t *q, int H, long D, uint32_t *qp) {
    const long P = D / 2;
    for (int b = 0; b < (H + 15) / 16; b++)
        for (long i = 0; i < P; i++)
            for (int l = 0; l < 16; l++)
                qp[(b * P + i) * 16 + l] = 16 * b + l < H ? pair_at(q + (long)(16 * b + l) * D, i) : 0;
}

/* scores() for H <= 8 in 256-bit registers: the same sums per lane; Zen 4 runs two 256-bit vdpbf16ps for one
 * 512-bit, so eight heads cost half as much as in 16 lanes half empty */
__attribute__((target("avx512f,avx512bf16,avx512vl"))) static void scores8(const uint16_t *q, int H, long D,
                                                                          const void *const *keys, long n,
                                                                          float scale, float *s, uint32_t *qp) {
    const long P = D / 2;
    const __m256 sc = _mm256_set1_ps(scale);
    const __mmask8 m = (__mmask8)((1u << H) - 1);
    for (long i = 0; i < P; i++)
        for (int l = 0; l < 8; l++) qp[i * 8 + l] = l < H ? pair_at(q + (long)l * D, i) : 0;
    long k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (long i = 0; i < P; i++) {
            const __m256bh qv = (__m256bh)_mm256_loadu_si256((const __m256i *)(qp + i * 8));
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_dpbf16_ps(acc[j], qv, (__m256bh)_mm256_set1_epi32((int)pair_at(keys[k + j], i)));
        }
        for (int j = 0; j < 8; j++) _mm256_mask_storeu_ps(s + (k + j) * H, m, _mm256_mul_ps(acc[j], sc));
    }
    for (; k < n; k++) {
        __m256 acc = _mm256_setzero_ps();
        for (long i = 0; i < P; i++)
            acc = _mm256_dpbf16_ps(acc, (__m256bh)_mm256_loadu_si256((const __m256i *)(qp + i * 8)),
                                   (__m256bh)_mm256_set1_epi32((int)pair_at(keys[k], i)));
        _mm256_mask_storeu_ps(s + k * H, m, _mm256_mul_ps(acc, sc));
    }
}

/* s[k * H + h] = scale * (q_h . key_k) for h < H, k < n: q [H, D] bf16, keys bf16 rows of D */
TARGET static void scores(const uint16_t *q, int H, long D, const void *const *keys, long n, float scale,
                          float *s, uint32_t *qp) {
    const long P = D / 2;
    const __m512 sc = _mm512_set1_ps(scale);
    pack_heads(q, H, D, qp);
    for (int h0 = 0; h0 < H; h0 += 16) {
        const int nh = H - h0 < 16 ? H - h0 : 16;
        const __mmask16 m = (__mmask16)((1u << nh) - 1);
        const uint32_t *qb = qp + h0 * P; /* this block of 16 heads */
        long k = 0;
        for (; k + 8 <= n; k += 8) {
            __m512 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
            for (long i = 0; i < P; i++) {
                const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + i * 16);
                for (int j = 0; j < 8; j++) acc[j] = _mm512_dpbf16_ps(acc[j], qv, BCAST(pair_at(keys[k + j], i)));
            }
            for (int j = 0; j < 8; j++) _mm512_mask_storeu_ps(s + (k + j) * H + h0, m, _mm512_mul_ps(acc[j], sc));
        }
        for (; k < n; k++) { /* the same sums, one key at a time */
            __m512 acc = _mm512_setzero_ps();
            for (long i = 0; i < P; i++)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + i * 16), BCAST(pair_at(keys[k], i)));
            _mm512_mask_storeu_ps(s + k * H + h0, m, _mm512_mul_ps(acc, sc));
        }
    }
}

/* o[h, d0 + 16c ...] for NH heads from h and NV vectors of 16 dims from d0, over every key pair */
TARGET static inline __attribute__((always_inline)) void values_block(const uint32_t *pp, const uint32_t *vi,
                                                                      long pairs, int H, long D, int h, long d0,
                                                                      const int NH, const int NV, float *o) {
    __m512 acc[4][4];
    for (int a = 0; a < NH; a++)
        for (int c = 0; c < NV; c++) acc[a][c] = _mm512_setzero_ps();
    for (long j = 0; j < pairs; j++) {
        __m512bh v[4];
        for (int c = 0; c < NV; c++) v[c] = (__m512bh)_mm512_loadu_si512(vi + j * D + d0 + 16 * c);
        for (int a = 0; a < NH; a++) {
            const __m512bh p = BCAST(pp[j * H + h + a]);
            for (int c = 0; c < NV; c++) acc[a][c] = _mm512_dpbf16_ps(acc[a][c], v[c], p);
        }
    }
    for (int a = 0; a < NH; a++)
        for (int c = 0; c < NV; c++) _mm512_storeu_ps(o + (long)(h + a) * D + d0 + 16 * c, acc[a][c]);
}

/* o[h, :] = sum_k bf16(p[k * H + h]) * key_k for h < H: D % 16 == 0 */
TARGET static void values(const float *p, const void *const *keys, long n, int H, long D, float *o, uint32_t *pp,
                          uint32_t *vi) {
    const long pairs = (n + 1) / 2;
    for (long j = 0; j < pairs; j++) {
        const int two = 2 * j + 1 < n;
        for (int h = 0; h < H; h++)
            pp[j * H + h] = f2bf(p[2 * j * H + h]) | (two ? (uint32_t)f2bf(p[(2 * j + 1) * H + h]) << 16 : 0u);
        const uint16_t *k0 = (const uint16_t *)keys[2 * j], *k1 = two ? (const uint16_t *)keys[2 * j + 1] : 0;
        for (long d = 0; d < D; d += 16) { /* dword d: key 2j's dim d low, key 2j + 1's high */
            const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(k0 + d)));
            const __m512i b = two ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(k1 + d)))
                                  : _mm512_setzero_si512();
            _mm512_storeu_si512(vi + j * D + d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
    }
    for (int h = 0; h < H; h += 4) {
        const int nh = H - h < 4 ? H - h : 4;
        for (long d0 = 0; d0 < D; d0 += 64) {
            const int nv = (D - d0) / 16 < 4 ? (int)((D - d0) / 16) : 4;
            if (nh == 4 && nv == 4)
                values_block(pp, vi, pairs, H, D, h, d0, 4, 4, o);
            else /* (the same sums, fewer heads or dims) */
                for (int a = 0; a < nh; a++)
                    for (int c = 0; c < nv; c++) values_block(pp, vi, pairs, H, D, h + a, d0 + 16 * c, 1, 1, o);
        }
    }
}

/* total[j + u] = sum_h w[h] * relu(q_h . key_{j + u}) for u < NK: the packed query, keys [.., D] bf16 */
TARGET static inline __attribute__((always_inline)) void index_group(const uint32_t *qp, const float *w, int H,
                                                                     long D, const uint16_t *keys, long j,
                                                                     const int NK, float *total) {
    const long P = D / 2;
    const __m512 zero = _mm512_setzero_ps();
    __m512 tot[8];
    for (int u = 0; u < NK; u++) tot[u] = zero;
    for (int b = 0; b < (H + 15) / 16; b++) {
        const uint32_t *qb = qp + b * P * 16;
        __m512 acc[8];
        for (int u = 0; u < NK; u++) acc[u] = zero;
        for (long i = 0; i < P; i++) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + i * 16);
            for (int u = 0; u < NK; u++) acc[u] = _mm512_dpbf16_ps(acc[u], qv, BCAST(pair_at(keys + (j + u) * D, i)));
        }
        const int nh = H - 16 * b < 16 ? H - 16 * b : 16;
        const __m512 wv = _mm512_maskz_loadu_ps((__mmask16)((1u << nh) - 1), w + 16 * b);
        for (int u = 0; u < NK; u++) tot[u] = _mm512_add_ps(tot[u], _mm512_mul_ps(_mm512_max_ps(acc[u], zero), wv));
    }
    for (int u = 0; u < NK; u++) total[j + u] = _mm512_reduce_add_ps(tot[u]);
}

/* index_group over keys j0 <= j < j1, eight at a time */
TARGET static void index_scores(const uint32_t *qp, const float *w, int H, long D, const uint16_t *keys, long j0,
                                long j1, float *total) {
    long j = j0;
    for (; j + 8 <= j1; j += 8) index_group(qp, w, H, D, keys, j, 8, total);
    for (; j < j1; j++) index_group(qp, w, H, D, keys, j, 1, total);
}

int v4c_attn_bf16(long D) { /* (every CPU with AVX512-BF16 has AVX512VL: asked anyway for scores8) */
    return D % 16 == 0 && v4c_isa_supported(V4C_ISA_AVX512BF16) && __builtin_cpu_supports("avx512vl");
}

int v4c_index_bf16(long D) { return D % 2 == 0 && v4c_isa_supported(V4C_ISA_AVX512BF16); }

void v4c_index_pack_bf16(const void *q, int H, long D, void *qp) { pack_heads((const uint16_t *)q, H, D, (uint32_t *)qp); }

void v4c_index_scores_bf16(const void *qp, const float *w, int H, long D, const void *keys, long j0, long j1,
                           float *total) {
    index_scores((const uint32_t *)qp, w, H, D, (const uint16_t *)keys, j0, j1, total);
}

void v4c_attn_scores_bf16(const void *q, int H, long D, const void *const *keys, long n, float scale, float *s,
                          void *work) {
    (H <= 8 ? scores8 : scores)((const uint16_t *)q, H, D, keys, n, scale, s, (uint32_t *)work);
}

void v4c_attn_values_bf16(const float *p, const void *const *keys, long n, int H, long D, float *o, void *work) {
    const long pairs = (n + 1) / 2;
    uint32_t *pp = (uint32_t *)work + packed_words(H, D);
    values(p, keys, n, H, D, o, pp, pp + pairs * H);
}

#else /* no AVX512-BF16 in this build: attention.c keeps its fp32 products */

int v4c_attn_bf16(long D) {
    (void)D;
    return 0;
}

int v4c_index_bf16(long D) {
    (void)D;
    return 0;
}

void v4c_index_pack_bf16(const void *q, int H, long D, void *qp) { (void)q, (void)H, (void)D, (void)qp; }

void v4c_index_scores_bf16(const void *qp, const float *w, int H, long D, const void *keys, long j0, long j1,
                           float *total) {
    (void)qp, (void)w, (void)H, (void)D, (void)keys, (void)j0, (void)j1, (void)total;
}

void v4c_attn_scores_bf16(const void *q, int H, long D, const void *const *keys, long n, float scale, float *s,
                          void *work) {
    (void)q, (void)H, (void)D, (void)keys, (void)n, (void)scale, (void)s, (void)work;
}

void v4c_attn_values_bf16(const float *p, const void *const *keys, long n, int H, long D, float *o, void *work) {
    (void)p, (void)keys, (void)n, (void)H, (void)D, (void)o, (void)work;
}

#endif
