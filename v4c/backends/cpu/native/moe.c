/* Routed experts (and the shared expert) for a decode step's few tokens, in one call: fp32, bf16 or
 * fp16 weights, any widths, any expert count and top-k.
 *
 * At decode the MoE is weight streaming: each expert hit is read once for one to a few token rows.
 * Through PyTorch that is two small products per expert plus the joins, activation and scatter
 * between them (about 80 ATen calls per layer at batch 8), and products of 2-8 rows stream the
 * weights at a fraction of the memory's rate. Here every weight row is read once, as a sequential
 * stream, and dotted with all of its expert's token rows (dots.c: AVX2 + FMA, AVX-512F or
 * AVX512-BF16, chosen per call from what the CPU has). Three passes over PyTorch's OpenMP team:
 *   1. the gate and up rows of every expert hit, the work split by inner index across the threads
 *      (so an expert's rows are shared out, not one expert per thread: at batch 1 seven items on
 *      two threads would leave one idle for a seventh of the time), then the clamped SwiGLU of
 *      those indices;
 *   2. the down rows, split by output row, weighted by each expert's inner width;
 *   3. the weighted sum per token, split by columns, adding the assignments in their order, so the
 *      result does not depend on the thread count.
 * Roundings follow the reference's ops: fp32 throughout for fp32; for bf16 (fp16) each product's output
 * and each activation step rounded to bf16 (fp16), the weighted sum in fp32, rounded once at the end.
 */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dots.h"
#include "moe_common.h"

struct item {   /* one expert hit (or the shared expert) and its token rows */
    long row;   /* its first row of the per-row buffers: assignments first, then the shared rows */
    int c;      /* token rows */
    int inner;  /* inner width */
    const char *gate, *up, *down;
    long wt;    /* units of the passes' split per inner index (pass 1) or per inner weight (pass 2) */
};

struct moe_job {
    int t, D, dt, x_bf16, nitems, Imax, shared; /* shared: items[0] is the shared expert, rows n .. n + t */
    long n, lo, k;
    const int64_t *perm;
    const float *w;
    const struct item *items;
    const long *start1, *start2; /* each item's first index in passes 1 and 2 (prefix sums, +1 entry) */
    v4c_dots_fn dots;
    float limit;
    const void **xrows, **arows; /* per row: its token's input, its activations */
    float *G, *U, *Y, *acc;      /* [rows, Imax], [rows, Imax], [rows, D] fp32; [t, D] sums */
    void *A;                     /* [rows, Imax] activations: fp32, or bf16 for a bf16-token kernel */
    void *out;
};



/* pass 1: gate and up rows [i0, i1) of each item in [a, e), then their activations */
static void up_rows(void *p, long a, long e, int tid) {
    (void)tid;
    const struct moe_job *j = (const struct moe_job *)p;
    const long D = j->D, esz = j->dt ? 2 : 4, ld = j->Imax;
    for (long it = first_item(j->start1, j->nitems, a); it < j->nitems && j->start1[it] < e; it++) {
        const struct item *m = &j->items[it];
        /* index i's units are start1 + i wt .. + wt: it belongs to the range holding the first */
        const long s = j->start1[it], i0 = clampl((a - s + m->wt - 1) / m->wt, 0, m->inner),
                   i1 = clampl((e - s + m->wt - 1) / m->wt, 0, m->inner);
        if (i0 >= i1) continue;
        float *G = j->G + m->row * ld, *U = j->U + m->row * ld;
        j->dots(m->gate + i0 * D * esz, i1 - i0, D, j->xrows + m->row, m->c, G + i0, ld);
        j->dots(m->up + i0 * D * esz, i1 - i0, D, j->xrows + m->row, m->c, U + i0, ld);
        for (int r = 0; r < m->c; r++) {
            const long at = (m->row + r) * ld + i0;
            moe_swiglu(G + r * ld + i0, U + r * ld + i0, i1 - i0, j->limit, j->dt, j->x_bf16 ? 0 : (float *)j->A + at,
                       j->x_bf16 ? (uint16_t *)j->A + at : 0);
        }
    }
}

/* pass 2: down rows of each item in [a, e); an item's span is D rows of `inner` units each */
static void down_rows(void *p, long a, long e, int tid) {
    (void)tid;
    const struct moe_job *j = (const struct moe_job *)p;
    const long D = j->D, esz = j->dt ? 2 : 4;
    for (long it = first_item(j->start2, j->nitems, a); it < j->nitems && j->start2[it] < e; it++) {
        const struct item *m = &j->items[it];
        const long s = j->start2[it], in = m->inner, u = in * m->wt; /* row o: the range holding s + o u */
        const long o0 = clampl((a - s + u - 1) / u, 0, D), o1 = clampl((e - s + u - 1) / u, 0, D);
        if (o0 >= o1) continue;
        float *Y = j->Y + m->row * D;
        j->dots(m->down + o0 * in * esz, o1 - o0, in, j->arows + m->row, m->c, Y + o0, D);
        moe_round_cols(Y, m->c, D, o0, o1, j->dt);
    }
}

/* pass 3: columns [d0, d1) of every token's weighted sum, assignments in their order */
static void combine(void *p, long d0, long d1, int tid) {
    (void)tid;
    const struct moe_job *j = (const struct moe_job *)p;
    moe_weighted_sum(j->t, j->D, j->shared, j->n, j->lo, j->k, j->perm, j->w, j->Y, j->acc, j->dt, j->out, d0, d1);
}



/* bytes of scratch `v4c_moe_decode` needs (`work`) for these sizes */
long v4c_moe_decode_work(int t, int D, int I, int Is, int k, int E) {
    const long rows = (long)t * k + t, Imax = I > Is ? I : Is;
    return 64 + align64(sizeof(struct item) * (E + 1L)) + 2 * align64(sizeof(long) * (E + 2L)) +
           2 * align64(sizeof(void *) * rows) + 3 * align64(sizeof(float) * rows * Imax) +
           align64(sizeof(float) * rows * D) + 2 * align64(sizeof(float) * (long)t * D);
}

/* out [t, D] = sum over the assignments a in [offsets[0], offsets[E]) of w[perm[a]] *
 * expert_e(x[perm[a] / k]) for the expert e whose range holds a, plus the shared expert's output
 * when sg is given. x, the weights and out of dtype dt (0 fp32, 1 bf16, 2 fp16); offsets (E + 1,
 * non-decreasing) and perm int64, w fp32. `isa`: the instruction set (V4C_ISA_*), or -1 for the
 * best this CPU has. `work`: v4c_moe_decode_work(...) bytes. Returns 0, -1 for
 * bad sizes or unsorted offsets, -3 when this CPU has no kernel for `isa` and dt. */
int v4c_moe_decode(int threads, int isa, int dt, int t, int D, int I, int Is, int k, int E, const void *x,
                   const int64_t *offsets, const int64_t *perm, const float *w, const void *w13, const void *w2,
                   const void *sg, const void *su, const void *sd, float limit, void *out, void *work) {
    if (t < 1 || D < 1 || I < 1 || (sg && Is < 1) || k < 1 || E < 1) return -1;
    for (int e = 0; e < E; e++)
        if (offsets[e + 1] < offsets[e]) return -1;
    if (isa < 0) isa = v4c_best_isa(dt);
    int x_bf16;
    const v4c_dots_fn dots = v4c_isa_supported(isa) ? v4c_dots_kernel(isa, dt, &x_bf16) : 0;
    if (!dots) return -3;
    const long lo = offsets[0], n = offsets[E] - lo, rows = n + (sg ? t : 0), esz = dt ? 2 : 4;
    const int Imax = I > Is ? I : Is;
    char *p = (char *)(((uintptr_t)work + 63) & ~(uintptr_t)63); /* (the pieces v4c_moe_decode_work counts) */
    struct item *items = take(&p, sizeof(struct item) * (E + 1L));
    long *start1 = take(&p, sizeof(long) * (E + 2L)), *start2 = take(&p, sizeof(long) * (E + 2L));
    const void **xrows = take(&p, sizeof(void *) * rows), **arows = take(&p, sizeof(void *) * rows);
    float *G = take(&p, sizeof(float) * rows * Imax), *U = take(&p, sizeof(float) * rows * Imax);
    float *A = take(&p, sizeof(float) * rows * Imax), *Y = take(&p, sizeof(float) * rows * D);
    float *acc = take(&p, sizeof(float) * (long)t * D), *x32 = take(&p, sizeof(float) * (long)t * D);
    /* the token rows in the form the kernel reads: fp32 (bf16 / fp16 widened once here), or bf16 as given */
    const char *xin = (const char *)x;
    long xesz = esz;
    if (dt && !x_bf16) {
        widen(x, dt, (long)t * D, x32);
        xin = (const char *)x32;
        xesz = 4;
    }
    int nitems = 0;
    if (sg) {
        items[nitems++] = (struct item){n, t, Is, (const char *)sg, (const char *)su, (const char *)sd};
        for (int r = 0; r < t; r++) xrows[n + r] = xin + r * D * xesz;
    }
    for (int e = 0; e < E; e++) {
        const long a = offsets[e] - lo, c = offsets[e + 1] - offsets[e];
        if (!c) continue;
        const char *g = (const char *)w13 + (long)e * 2 * I * D * esz;
        items[nitems++] = (struct item){a, (int)c, I, g, g + (long)I * D * esz, (const char *)w2 + (long)e * D * I * esz};
        for (long r = 0; r < c; r++) xrows[a + r] = xin + (perm[lo + a + r] / k) * D * xesz;
    }
    const long aesz = x_bf16 ? 2 : 4;
    for (long r = 0; r < rows; r++) arows[r] = (const char *)A + r * Imax * aesz;
    /* A decode call streams each weight once: its split shares out weights. A prefill call's items
     * differ in rows (the shared expert holds every token, a routed one ~t k / E): split by weights, the
     * thread holding the shared expert took ~30% more of the products than the other (478M, 512 tokens),
     * so there each index counts once per token row. (The split changes no result, only who computes it.) */
    start1[0] = start2[0] = 0;
    for (int i = 0; i < nitems; i++) {
        items[i].wt = t > 16 ? items[i].c : 1;
        start1[i + 1] = start1[i] + items[i].inner * items[i].wt;
        start2[i + 1] = start2[i] + (long)D * items[i].inner * items[i].wt;
    }
    struct moe_job j = {t, D, dt, x_bf16, nitems, Imax, sg != 0, n, lo, k, perm, w, items, start1, start2, dots, limit,
                        xrows, arows, G, U, Y, acc, A, out};
    /* each thread's share at least 64 KiB of weights (pass 1: two rows of D per unit; pass 2: units
     * of one weight), or 16K multiply-adds of the sums (pass 3): below that a second thread's
     * wake-up costs more than it saves */
    if (nitems) {
        v4c_parallel_rows(start1[nitems], threads, (32768 + D * esz - 1) / (D * esz), up_rows, &j);
        v4c_parallel_rows(start2[nitems], threads, 65536 / esz, down_rows, &j);
    }
    v4c_parallel_rows(D, threads, 16384 / (n + (sg ? t : 0) + 1) + 1, combine, &j);
    return 0;
}
