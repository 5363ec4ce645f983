/* Routed experts (and the shared expert) for a decode step's few bf16 tokens, in one call, on
 * CPUs with AVX512-BF16 dot products.
 *
 * At decode the MoE is weight streaming: each expert hit is read once for one to a few token
 * rows. Through PyTorch that is two small products per expert plus the joins, activation and
 * scatter between them (about 80 ATen calls per layer at batch 8), and products of 2-8 rows
 * stream the weights at a fraction of the memory's rate. Here each expert is one work item: the
 * up-projection, clamped SwiGLU and down-projection with every weight row read once, as one
 * sequential stream, and dotted with all of the expert's token rows (vdpbf16ps: bf16 pairs,
 * fp32 sums), items split across PyTorch's OpenMP threads. A last pass adds every token's
 * weighted expert outputs in assignment order, so the result does not depend on the threads.
 * Roundings follow the reference's ops: each product's output and each activation step rounded
 * to bf16; the weighted sum is fp32, rounded once at the end.
 * Without the instructions (or the compiler's support for them) `v4c_moe_decode_available`
 * returns 0 and the PyTorch path runs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__GNUC__) && defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 11)
#define V4C_BF16DOT 1
#include <immintrin.h>
#define BF16DOT __attribute__((target("avx512f,avx512bf16")))
#else
#define V4C_BF16DOT 0
#endif

int v4c_moe_decode_available(void) {
#if V4C_BF16DOT
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

#if V4C_BF16DOT
/* Y [c, N] (fp32) = X [c, K] . W [N, K]^T, all bf16 in, K % 32 == 0: one weight row at a time
 * (a single sequential stream), dotted with up to four token rows per pass */
BF16DOT static void gemv_bf16(const uint16_t *X, int c, const uint16_t *W, long N, long K, float *Y) {
    for (int r0 = 0; r0 < c; r0 += 4) {
        const int rc = c - r0 < 4 ? c - r0 : 4;
        for (long o = 0; o < N; o++) {
            const uint16_t *w = W + o * K;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (long k = 0; k < K; k += 32) {
                const __m512i wv = _mm512_loadu_si512((const void *)(w + k));
                for (int r = 0; r < rc; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv,
                                              (__m512bh)_mm512_loadu_si512((const void *)(X + (r0 + r) * K + k)));
            }
            for (int r = 0; r < rc; r++) Y[(r0 + r) * N + o] = _mm512_reduce_add_ps(acc[r]);
        }
    }
}
#endif

struct moe_job {
    int t, D, I, Is, k, E;
    const uint16_t *x;
    const int64_t *offsets, *perm;
    const uint16_t *w13, *w2, *sg, *su, *sd;
    float limit;
    const int *item_expert; /* expert of each item; -1: the shared expert */
    float *y;               /* [assignments + t, D]: each assignment's expert output, then the shared one's */
    int failed;
};

#if V4C_BF16DOT
/* one expert over c token rows tok[]: Y [c, D], rounded to bf16 */
BF16DOT static void expert(const struct moe_job *j, const int64_t *tok, int c, const uint16_t *wg, const uint16_t *wu,
                           const uint16_t *wd, int inner, float *Y, uint16_t *X, float *H, float *U, uint16_t *A) {
    const long D = j->D;
    for (int r = 0; r < c; r++) memcpy(X + r * D, j->x + tok[r] * D, D * sizeof(uint16_t));
    if (wu) { /* the shared expert: gate and up are separate matrices */
        gemv_bf16(X, c, wg, inner, D, H);
        gemv_bf16(X, c, wu, inner, D, U);
    } else { /* a routed expert: [gate; up] stacked */
        gemv_bf16(X, c, wg, 2L * inner, D, H);
    }
    const float lim = j->limit;
    for (int r = 0; r < c; r++)
        for (int i = 0; i < inner; i++) {
            float g = round_to(wu ? H[r * inner + i] : H[r * 2 * inner + i], 1);
            float u = round_to(wu ? U[r * inner + i] : H[r * 2 * inner + inner + i], 1);
            g = g < lim ? g : lim;
            u = u < -lim ? -lim : (u > lim ? lim : u);
            const float s = round_to(g / (1.0f + expf(-g)), 1);
            A[r * inner + i] = f2bf(s * u);
        }
    gemv_bf16(A, c, wd, D, inner, Y);
    for (long i = 0; i < (long)c * D; i++) Y[i] = round_to(Y[i], 1);
}

BF16DOT static void moe_items(void *p, long a, long e, int tid) {
    (void)tid;
    struct moe_job *j = (struct moe_job *)p;
    const long D = j->D, lo = j->offsets[0];
    const int inner = j->I > j->Is ? j->I : j->Is, rows = j->t;
    float *H = malloc(sizeof(float) * 3L * rows * inner);
    uint16_t *X = malloc(sizeof(uint16_t) * rows * (D + (long)inner));
    int64_t *tok = malloc(sizeof(int64_t) * rows);
    if (!H || !X || !tok) {
        free(H);
        free(X);
        free(tok);
        j->failed = 1;
        return;
    }
    float *U = H + 2L * rows * inner;
    uint16_t *A = X + rows * D;
    for (long it = a; it < e; it++) {
        const int ex = j->item_expert[it];
        if (ex < 0) {
            for (int r = 0; r < rows; r++) tok[r] = r;
            expert(j, tok, rows, j->sg, j->su, j->sd, j->Is, j->y + (j->offsets[j->E] - lo) * D, X, H, U, A);
            continue;
        }
        const long s1 = j->offsets[ex + 1];
        for (long s = j->offsets[ex]; s < s1;) { /* at most `rows` assignments at a time (a token may repeat an expert) */
            const int c = (int)(s1 - s < rows ? s1 - s : rows);
            for (int r = 0; r < c; r++) tok[r] = j->perm[s + r] / j->k;
            expert(j, tok, c, j->w13 + (long)ex * 2 * j->I * D, 0, j->w2 + (long)ex * D * j->I, j->I,
                   j->y + (s - lo) * D, X, H, U, A);
            s += c;
        }
    }
    free(H);
    free(X);
    free(tok);
}
#endif

/* out [t, D] = sum over the assignments a in [offsets[0], offsets[E]) of w[perm[a]] *
 * expert_e(x[perm[a] / k]) for the expert e whose range holds a, plus the shared expert's output
 * when sg is given. x, the weights and out bf16; offsets (E + 1, non-decreasing) and perm int64,
 * w fp32. D, I and Is multiples of 32. Returns 0, -1 for bad sizes or unsorted offsets, -2 when
 * memory could not be allocated, -3 without AVX512-BF16. */
int v4c_moe_decode(int threads, int t, int D, int I, int Is, int k, int E, const uint16_t *x, const int64_t *offsets,
                   const int64_t *perm, const float *w, const uint16_t *w13, const uint16_t *w2, const uint16_t *sg,
                   const uint16_t *su, const uint16_t *sd, float limit, uint16_t *out) {
    if (!v4c_moe_decode_available()) return -3;
#if V4C_BF16DOT
    if (t < 1 || D % 32 || I % 32 || (sg && Is % 32) || k < 1 || E < 1) return -1;
    for (int e = 0; e < E; e++)
        if (offsets[e + 1] < offsets[e]) return -1;
    const long n = offsets[E] - offsets[0];
    int *item_expert = malloc(sizeof(int) * (E + 1));
    float *y = malloc(sizeof(float) * (n + t) * (long)D), *acc = malloc(sizeof(float) * (long)t * D);
    if (!item_expert || !y || !acc) {
        free(item_expert);
        free(y);
        free(acc);
        return -2;
    }
    int items = 0;
    if (sg) item_expert[items++] = -1;
    for (int e = 0; e < E; e++)
        if (offsets[e + 1] > offsets[e]) item_expert[items++] = e;
    struct moe_job j = {t, D, I, Is, k, E, x, offsets, perm, w13, w2, sg, su, sd, limit, item_expert, y, 0};
    v4c_parallel_rows(items, threads, 1, moe_items, &j);
    if (!j.failed) {
        if (sg)
            memcpy(acc, y + n * D, sizeof(float) * (long)t * D);
        else
            memset(acc, 0, sizeof(float) * (long)t * D);
        for (long a = 0; a < n; a++) { /* assignment order: the same sums for any thread count */
            const int64_t slot = perm[offsets[0] + a];
            const float wa = w[slot], *ya = y + a * D;
            float *o = acc + (slot / k) * D;
            for (long d = 0; d < D; d++) o[d] += wa * ya[d];
        }
        for (long i = 0; i < (long)t * D; i++) out[i] = f2bf(acc[i]);
    }
    free(item_expert);
    free(y);
    free(acc);
    return j.failed ? -2 : 0;
#else
    (void)threads, (void)t, (void)D, (void)I, (void)Is, (void)k, (void)E, (void)x, (void)offsets, (void)perm, (void)w;
    (void)w13, (void)w2, (void)sg, (void)su, (void)sd, (void)limit, (void)out;
    return -3;
#endif
}
