/* Dense projections of a decode step's few token rows, fp32, bf16 or fp16, any widths:
 * y [t, G, R] = x [t, G, K] . W [G * R, K]^T group by group (G > 1: the output projection's
 * block-diagonal GEMM; G = 1: a plain linear).
 *
 * Why: at decode a projection is a matrix-vector product for one to sixteen rows, bound by streaming
 * W once. PyTorch's bf16 GEMM on CPUs without AVX512-BF16 computes such products at a few GFLOP/s
 * (measured: 8 rows times a 1024 x 1024 bf16 weight, ten times the fp32 product's time), and its
 * grouped product (einsum) adds copies. Here each weight row is read once and dotted with every
 * token row (dots.c), the output rows split across PyTorch's OpenMP team.
 * Roundings: fp32 sums, each output rounded once to the activations' dtype, as a GEMM does.
 */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dots.h"

struct lin_job {
    int t, dt;
    long R, K, N;
    const char *w;
    const void **xrows; /* [G, t]: group g's token rows */
    v4c_dots_fn dots;
    float *y;   /* [t, N] fp32: the output itself (fp32) or its sums before rounding (bf16, fp16) */
    void *out;
};

/* output rows [a, e) (within the groups they fall in) */
static void lin_rows(void *p, long a, long e, int tid) {
    (void)tid;
    const struct lin_job *j = (const struct lin_job *)p;
    const long esz = j->dt ? 2 : 4;
    for (long g = a / j->R; g * j->R < e; g++) {
        const long o0 = a > g * j->R ? a : g * j->R, o1 = e < (g + 1) * j->R ? e : (g + 1) * j->R;
        j->dots(j->w + o0 * j->K * esz, o1 - o0, j->K, j->xrows + g * j->t, j->t, j->y + o0, j->N);
        if (j->dt)
            for (int r = 0; r < j->t; r++)
                store_from((uint16_t *)j->out + r * j->N + o0, j->dt, j->y + r * j->N + o0, o1 - o0);
    }
}

/* bytes of scratch `v4c_linear` needs for these sizes */
long v4c_linear_work(int t, int G, long K, long N) {
    return 64 + sizeof(void *) * (long)t * G + sizeof(float) * ((long)t * G * K + (long)t * N) + 64;
}

/* out [t, G * R] = per group g: x[:, g, :] [t, K] . W[g * R : (g + 1) * R] [R, K]^T; x, W and out of
 * dtype dt (0 fp32, 1 bf16, 2 fp16), x rows contiguous ([t, G, K]). `isa`: V4C_ISA_*, or -1 for the best
 * this CPU has. Returns 0, -1 for bad sizes, -3 when this CPU has no kernel for `isa` and dt. */
int v4c_linear(int threads, int isa, int dt, int t, int G, long R, long K, const void *x, const void *W, void *out,
               void *work) {
    if (t < 1 || G < 1 || R < 1 || K < 1) return -1;
    if (isa < 0) isa = v4c_best_isa(dt);
    int x_bf16;
    const v4c_dots_fn dots = v4c_isa_supported(isa) ? v4c_dots_kernel(isa, dt, &x_bf16) : 0;
    if (!dots) return -3;
    const long N = (long)G * R, esz = dt ? 2 : 4;
    const void **xrows = (const void **)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    float *x32 = (float *)(xrows + (long)t * G), *y = x32 + (long)t * G * K;
    const char *xin = (const char *)x;
    long xesz = esz;
    if (dt && !x_bf16) { /* bf16 / fp16 token rows widened once, for kernels that read fp32 */
        widen(x, dt, (long)t * G * K, x32);
        xin = (const char *)x32;
        xesz = 4;
    }
    for (int g = 0; g < G; g++)
        for (int r = 0; r < t; r++) xrows[(long)g * t + r] = xin + ((long)r * G + g) * K * xesz;
    struct lin_job j = {t, dt, R, K, N, (const char *)W, xrows, dots, dt ? y : (float *)out, out};
    /* a thread's share at least 64 KiB of weights: below that, waking a second thread costs more
     * than it saves */
    const long grain = (65536 + K * esz - 1) / (K * esz);
    v4c_parallel_rows(N, threads, grain, lin_rows, &j);
    return 0;
}
