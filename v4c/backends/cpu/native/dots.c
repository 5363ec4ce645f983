/* The dot-product kernels of a decode step's weight streaming (the MoE's experts, moe.c; the dense
 * projections, linear.c), one per instruction set and weight dtype (dots_template.h holds their
 * loops): AVX2 + FMA and AVX-512F for fp32, bf16 and fp16 weights (bf16 and fp16 widened to fp32 in
 * registers, fp16 by F16C's conversion; fp32 token rows), AVX512-BF16 for bf16 weights (vdpbf16ps:
 * bf16 pairs, fp32 sums, bf16 token rows), and
 * AVX-512VL: AVX2's loops on 32 registers (bigger blocks for prefill calls, the same bits as AVX2).
 *
 * Each is compiled with a function-level target attribute, not -march: the library holds all of
 * them and runs on any x86-64 CPU; `v4c_isa_supported` asks the CPU (and whether the OS saves the
 * wider registers) before the driver calls one. Elsewhere (another architecture or compiler) no
 * kernel is built and the PyTorch path runs. */
#include <stdint.h>

#include "common.h"
#include "dots.h"

#if V4C_X86
#include <immintrin.h>

#include "reduce512.h"
#endif

int v4c_isa_supported(int isa) {
#if V4C_X86
    __builtin_cpu_init();
    switch (isa) {
    case V4C_ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case V4C_ISA_AVX512F: return __builtin_cpu_supports("avx512f");
    case V4C_ISA_AVX512VL:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#if V4C_BF16DOT
    case V4C_ISA_AVX512BF16: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#endif
    default: return 0;
    }
#else
    (void)isa;
    return 0;
#endif
}

#if V4C_X86

/* ---- AVX2 + FMA: 8 fp32 lanes ------------------------------------------------------------- */
#define TARGET __attribute__((target("avx2,fma")))
TARGET static inline __attribute__((always_inline)) float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[j] = hsum256(v[j]) for j < 8, the same additions of the same lanes, four shuffles and adds a
 * step for all eight sums instead of one register's worth of work per sum */
TARGET static inline __attribute__((always_inline)) void hsum256x8(const __m256 *v, float *out) {
    __m256 p[4], q[2];
    for (int j = 0; j < 4; j++) /* [lo + hi of v[2j] | of v[2j + 1]] */
        p[j] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * j], v[2 * j + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * j], v[2 * j + 1], 0x31));
    for (int j = 0; j < 2; j++) /* lanes 0 + 2 and 1 + 3 of each: v[4j], v[4j + 2] | v[4j + 1], v[4j + 3] */
        q[j] = _mm256_add_ps(_mm256_shuffle_ps(p[2 * j], p[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(p[2 * j], p[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* lane 0 + lane 1: v[0], v[2], v[4], v[6] | v[1], v[3], v[5], v[7] */
    const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
    float t[8];
    _mm256_storeu_ps(t, r);
    for (int j = 0; j < 4; j++) {
        out[2 * j] = t[j];
        out[2 * j + 1] = t[4 + j];
    }
}
#define LANES 8
#define VEC __m256
#define ZERO() _mm256_setzero_ps()
#define HSUM(v) hsum256(v)
#define XT float
#define XV __m256
#define XLOAD(p) _mm256_loadu_ps(p)
#define XF(v) (v)
#define MAC(acc, w, x) _mm256_fmadd_ps(w, x, acc)

#define NAME dots_avx2_f32
#define WT float
#define WV __m256
#define WLOAD(p) _mm256_loadu_ps(p)
#define WF(v) (v)
#include "dots_template.h"

#define NAME dots_avx2_bf16
#define WT uint16_t
#define WV __m256
#define WLOAD(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define WF(v) bf2f(v)
#include "dots_template.h"

#undef TARGET
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define NAME dots_avx2_f16
#define WT uint16_t
#define WV __m256
#define WLOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define WF(v) h2f(v)
#include "dots_template.h"

#undef TARGET

/* ---- AVX-512VL: AVX2's 8 lanes and order (the same bits), 32 registers ------------------------ */
/* Twice the registers hold 4 weight rows x 6 token rows of sums: a step's 10 loads feed 24 multiply-adds
 * (7 for 12 above), and the sums are reduced eight at a time. Only prefill calls (more than 3 token
 * rows) block differently; fewer rows run the loops above, as compiled here. */
#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))
#define RCMAX 6
#define HSUM8V(v, out) hsum256x8(v, out)

#define NAME dots_avx512vl_f32
#define WT float
#define WV __m256
#define WLOAD(p) _mm256_loadu_ps(p)
#define WF(v) (v)
#include "dots_template.h"

#define NAME dots_avx512vl_bf16
#define WT uint16_t
#define WV __m256
#define WLOAD(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define WF(v) bf2f(v)
#include "dots_template.h"

#define NAME dots_avx512vl_f16
#define WT uint16_t
#define WV __m256
#define WLOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define WF(v) h2f(v)
#include "dots_template.h"

#undef TARGET
#undef RCMAX
#undef HSUM8V
#undef LANES
#undef VEC
#undef ZERO
#undef HSUM
#undef XV
#undef XLOAD
#undef MAC

/* ---- AVX-512F: 16 fp32 lanes -------------------------------------------------------------- */
#define TARGET __attribute__((target("avx512f")))
#define LANES 16
#define VEC __m512
#define ZERO() _mm512_setzero_ps()
#define HSUM(v) v4c_hsum512(v)
#define HSUM8V(v, out) v4c_hsum512x8(v, out)
#define XV __m512
#define XLOAD(p) _mm512_loadu_ps(p)
#define MAC(acc, w, x) _mm512_fmadd_ps(w, x, acc)

#define NAME dots_avx512_f32
#define WT float
#define WV __m512
#define WLOAD(p) _mm512_loadu_ps(p)
#define WF(v) (v)
#include "dots_template.h"

#define NAME dots_avx512_bf16
#define WT uint16_t
#define WV __m512
#define WLOAD(p)                                                                                        \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define WF(v) bf2f(v)
#include "dots_template.h"

#define NAME dots_avx512_f16
#define WT uint16_t
#define WV __m512
#define WLOAD(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define WF(v) h2f(v)
#include "dots_template.h"

#undef TARGET
#undef XT
#undef XV
#undef XLOAD
#undef XF
#undef MAC
#undef LANES

#if V4C_BF16DOT
/* ---- AVX512-BF16: 32 bf16 pairs summed into 16 fp32 lanes ----------------------------------- */
#define TARGET __attribute__((target("avx512f,avx512bf16")))
#define LANES 32
#define XT uint16_t
#define XV __m512bh
#define XLOAD(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
#define XF(v) bf2f(v)
#define MAC(acc, w, x) _mm512_dpbf16_ps(acc, w, x)

#define NAME dots_avx512bf16_bf16
#define WT uint16_t
#define WV __m512bh
#define WLOAD(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
#define WF(v) bf2f(v)
#include "dots_template.h"
#endif

#endif /* V4C_X86 */

/* AMD family 19h (Zen 3, Zen 4) runs fp32 faster on AVX2's 8 lanes: Zen 4 splits a 512-bit
 * operation into two 256-bit halves, so AVX-512F adds no multiply-add rate, and its 16-lane sums end
 * every dot in a longer reduction (an expert's down rows are only 256 wide). Measured on a 2-core Zen 4,
 * the C MoE over 512 tokens: 29.0 ms a layer on AVX-512F against 23.5 on AVX2 (hidden 512, 32
 * experts), 55.2 against 48.4 (hidden 1,024, 64 experts); decode calls equal or AVX2 ahead (8 tokens:
 * 1.75 against 1.50 ms). With AVX-512VL the same lanes get 32 registers (blocks of 4 x 6): the same
 * MoE 20.0 against 21.1 ms (hidden 512), 47.8 against 49.8 (1,024), 8.2 against 8.6 at 64 tokens,
 * decode equal. bf16 weights keep AVX512-BF16, which is faster there. */
static int prefers_8_lanes(int wdt) {
#if V4C_X86
    __builtin_cpu_init();
    return wdt != 1 && __builtin_cpu_is("amdfam19h"); /* fp16 weights too: fp32 multiply-adds after widening */
#else
    (void)wdt;
    return 0;
#endif
}

static int pick_isa(int wdt) {
    static const int order[] = {V4C_ISA_AVX512BF16, V4C_ISA_AVX512F, V4C_ISA_AVX512VL, V4C_ISA_AVX2};
    if (prefers_8_lanes(wdt)) {
        if (v4c_isa_supported(V4C_ISA_AVX512VL)) return V4C_ISA_AVX512VL;
        if (v4c_isa_supported(V4C_ISA_AVX2)) return V4C_ISA_AVX2;
    }
    for (int i = 0; i < 4; i++) {
        int xb;
        if (v4c_isa_supported(order[i]) && v4c_dots_kernel(order[i], wdt, &xb)) return order[i];
    }
    return V4C_ISA_NONE;
}

int v4c_best_isa(int wdt) {
    /* asked on every decode call: the CPU's answer once per weight dtype (threads racing here all
     * store the same value) */
    static int best[3] = {-1, -1, -1};
    const int w = wdt == 1 || wdt == 2 ? wdt : 0;
    if (best[w] < 0) best[w] = pick_isa(w);
    return best[w];
}

v4c_dots_fn v4c_dots_kernel(int isa, int wdt, int *x_bf16) {
    *x_bf16 = 0;
#if V4C_X86
    if (wdt == 2) { /* fp16 weights: F16C's conversions (every AVX2 CPU has them; checked all the same) */
        __builtin_cpu_init();
        if (!__builtin_cpu_supports("f16c")) return 0;
        switch (isa) {
        case V4C_ISA_AVX2: return dots_avx2_f16;
        case V4C_ISA_AVX512F: return dots_avx512_f16;
        case V4C_ISA_AVX512VL: return dots_avx512vl_f16;
        default: return 0;
        }
    }
    switch (isa) {
    case V4C_ISA_AVX2: return wdt ? dots_avx2_bf16 : dots_avx2_f32;
    case V4C_ISA_AVX512F: return wdt ? dots_avx512_bf16 : dots_avx512_f32;
    case V4C_ISA_AVX512VL: return wdt ? dots_avx512vl_bf16 : dots_avx512vl_f32;
#if V4C_BF16DOT
    case V4C_ISA_AVX512BF16:
        if (wdt != 1) return 0;
        *x_bf16 = 1;
        return dots_avx512bf16_bf16;
#endif
    default: return 0;
    }
#else
    (void)isa, (void)wdt;
    return 0;
#endif
}
