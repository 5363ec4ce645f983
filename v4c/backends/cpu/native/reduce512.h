/* Sums of the 16 lanes of AVX-512 accumulators, one at a time or eight at once, for the kernels that end
 * each dot product in a 16-lane register (dots.c's AVX-512 kernels, quant_bf16.c).
 *
 * Both do the same additions in the same order for every accumulator (GCC's _mm512_reduce_add_ps tree:
 * the halves, the quarters, lanes 0 + 2 and 1 + 3, then those two), so a kernel that reduces some sums
 * eight at a time and the rest one by one gives a row the same bits whichever way it went. Eight at
 * once: the sums' common steps share each shuffle and add, ~3 instructions a sum instead of ~8, which
 * matters where a dot product is short (an expert's down projection: 8 steps of 32 bf16 pairs). */
#ifndef V4C_NATIVE_REDUCE512_H
#define V4C_NATIVE_REDUCE512_H

#include <immintrin.h>

#define V4C_R512 __attribute__((target("avx512f"), always_inline)) static inline

V4C_R512 float v4c_hsum512(__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[j] = v4c_hsum512(v[j]) for j < 8 */
V4C_R512 void v4c_hsum512x8(const __m512 *v, float *out) {
    __m512 t[4], u[2];
    for (int j = 0; j < 4; j++) /* [low + high half of v[2j] | of v[2j + 1]] */
        t[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
    for (int j = 0; j < 2; j++) /* 128-bit chunk c: quarter 0 + quarter 1 of v[4j + c] */
        u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0xDD));
    /* chunk c: lanes 0 + 2 and 1 + 3 of v[c], then of v[4 + c] */
    const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* chunk c: the sum of v[c], of v[4 + c] (twice) */
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(w, w, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(w, w, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 o = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), f);
    _mm256_storeu_ps(out, _mm512_castps512_ps256(o));
}

#undef V4C_R512
#endif
