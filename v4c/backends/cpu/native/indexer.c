/* The lightning indexer's selection over plain (fp32 / bf16) compressed keys: per
 * query, score every compressed row complete at its position, sum_h w_h * relu(q_h . k_j) (w already
 * times the two scales), and keep the top k. The PyTorch path widened the whole key cache to fp32,
 * ran two batched products, a mask, top-k and two fixes on its output: a dozen calls and a copy of
 * the cache per call. Here each key row is widened once into a small buffer and met by every head
 * (dots(): fp32 dot products, eight lanes; bf16 pairs on AVX512-BF16, attention_bf16.c), rows split
 * across threads (a prefill's queries, when there are more than threads); then a quickselect and a sort
 * of the k chosen, best first, ties to the lower row (the reference's top-k leaves ties unordered).
 * Rows not visible, and picks beyond the visible rows, read -1. dt codes: 0 fp32, 1 bf16. */
#include <stdint.h>
#include <string.h>

#include "common.h"

/* A pick as one integer whose ascending order is the ranking: the score mapped to unsigned bits in its
 * order, inverted (best first), then the row (ties to the lower row). Integer compares, no callback:
 * the selection and sort of 256 picks among 1,024 rows had been 40% of a 4,096-token prefill's indexer. */
typedef uint64_t pick_t;

static inline pick_t pick_of(float v, int j) {
    v += 0.0f; /* -0 as +0: equal scores tie to the lower row */
    uint32_t u;
    memcpy(&u, &v, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)~u << 32) | (uint32_t)j;
}

static inline int row_of(pick_t p) { return (int)(uint32_t)p; }

static inline uint32_t key_of(pick_t p) { return (uint32_t)(p >> 32); } /* the score's rank bits */

/* Picks in rank order by radix, not by comparisons: a comparison's outcome on scores is a coin flip the
 * branch predictor loses, and the quickselect and quicksort that ran here (256 of 1,024 rows a query)
 * were ~45% of a 4,096-token prefill's indexer. Both steps below keep the rows ascending within equal
 * scores, so the order is the same as sorting the 64-bit picks: ties to the lower row. */

/* sel[0 .. k) = the k smallest picks of p[0 .. n) (p in row order; k < n), in row order within each equal
 * score; p is scratch. MSD radix select on the 32-bit score ranks, a byte at a time: the picks of digits
 * below the one where the k-th falls are in, those of that digit stay candidates for the next byte. */
static void select_radix(pick_t *p, long n, long k, pick_t *sel) {
    long c = n, got = 0, need = k;
    for (int shift = 24; shift >= 0 && need > 0; shift -= 8) {
        long count[256] = {0};
        for (long i = 0; i < c; i++) count[(key_of(p[i]) >> shift) & 255]++;
        long below = 0;
        int b = 0;
        for (; below + count[b] < need; b++) below += count[b];
        if (count[b] == c) continue; /* every candidate has this digit: the next byte decides */
        long nc = 0;
        for (long i = 0; i < c; i++) { /* branch-free: each pick written to both places, kept where it belongs */
            const long d = (long)((key_of(p[i]) >> shift) & 255);
            const pick_t v = p[i];
            sel[got] = v;
            p[nc] = v;
            got += d < b;
            nc += d == b;
        }
        need -= below;
        c = nc;
    }
    for (long i = 0; i < need; i++) sel[got++] = p[i]; /* equal scores to the end: the lowest rows */
}

/* p[0 .. n) sorted by score rank, equal ranks kept in their order (LSD radix, a byte a pass, stable); tmp
 * holds n picks. Returns where the sorted picks are (p or tmp). */
static pick_t *sort_radix(pick_t *p, long n, pick_t *tmp) {
    for (int shift = 0; shift < 32; shift += 8) {
        long count[256] = {0};
        for (long i = 0; i < n; i++) count[(key_of(p[i]) >> shift) & 255]++;
        if (n == 0 || count[(key_of(p[0]) >> shift) & 255] == n) continue; /* one digit: nothing moves */
        long at = 0;
        for (int d = 0; d < 256; d++) {
            const long cd = count[d];
            count[d] = at;
            at += cd;
        }
        for (long i = 0; i < n; i++) tmp[count[(key_of(p[i]) >> shift) & 255]++] = p[i];
        pick_t *t = p;
        p = tmp;
        tmp = t;
    }
    return p;
}

/* attention_bf16.c */
int v4c_index_bf16(long D);
long v4c_index_bf16_work(int H, long D);
void v4c_index_pack_bf16(const void *q, int H, long D, void *qp);
void v4c_index_scores_bf16(const void *qp, const float *w, int H, long D, const void *keys, long j0, long j1,
                           float *total);

struct scan_job {
    const float *q, *w; /* one query: [H, D] fp32, [H] */
    const void *qp;     /* or, with pairs, packed bf16 (attention_bf16.c) */
    const char *keys;   /* [n, D] of dtype kdt */
    int H, D, kdt, pairs;
    float *total;   /* [n] */
    float *scratch; /* per thread: D + H floats */
};

V4C_CLONES static void scan_rows(void *ctx, long j0, long j1, int tid) {
    const struct scan_job *s = (const struct scan_job *)ctx;
    if (s->pairs) {
        v4c_index_scores_bf16(s->qp, s->w, s->H, s->D, s->keys, j0, j1, s->total);
        return;
    }
    float *kf = s->scratch + (long)tid * (s->D + s->H), *dotv = kf + s->D;
    const long esz = s->kdt ? 2 : 4;
    for (long j = j0; j < j1; j++) {
        widen(s->keys + j * s->D * esz, s->kdt, s->D, kf);
        dots(s->q, kf, s->D, s->H, dotv);
        float t = 0.f;
        for (int h = 0; h < s->H; h++) t += s->w[h] * (dotv[h] > 0.f ? dotv[h] : 0.f);
        s->total[j] = t;
    }
}

/* one query's scratch: the picks and scores of N rows, its fp32 query and weights, its packed query; a
 * multiple of 64 bytes (each thread's starts aligned) */
static long region_bytes(int H, int D, long N) {
    const long b = N * (long)(sizeof(pick_t) + 4) + (long)(H * D + H) * 4 + v4c_index_bf16_work(H, D);
    return (b + 63) / 64 * 64;
}

/* a region per thread (a prefill scores a query on each), then a key's widened row and dot products per
 * thread (a decode call's threads share one query's rows) */
long v4c_indexer_work(int threads, int H, int D, long n) {
    return (long)threads * (region_bytes(H, D, n) + (long)(D + H) * 4);
}

struct topk_job {
    long T;
    int H, D, qdt, kdt, pairs, ratio, topk, threads; /* threads: a query's rows split among them (1: none) */
    int team;                                         /* the call's threads: the regions and scratch rows */
    const char *q, *w, *keys;
    long N;
    const int64_t *pos;
    float scale;
    int64_t *out;
    char *work;
};

/* query rows r0 <= r < r1, each scored over its visible rows with `threads` threads (1: inline) */
static void query_rows(void *ctx, long r0, long r1, int tid) {
    const struct topk_job *a = (const struct topk_job *)ctx;
    const long qesz = a->qdt ? 2 : 4, kesz = a->kdt ? 2 : 4, D = a->D, H = a->H;
    const long region = region_bytes(a->H, a->D, a->N);
    pick_t *picks = (pick_t *)(a->work + (long)tid * region);
    float *total = (float *)(picks + a->N), *qf = total + a->N, *wf = qf + H * D;
    void *qp = wf + H;
    float *scratch = (float *)(a->work + (long)a->team * region); /* row `tid` of it is this thread's */
    for (long row = r0; row < r1; row++) {
        const long b = row / a->T;
        int64_t *o = a->out + row * a->topk;
        const int64_t p = a->pos[row];
        long vis = p < 0 ? 0 : (long)((p + 1) / a->ratio);
        if (vis > a->N) vis = a->N;
        const char *qrow = a->q + row * H * D * qesz;
        if (a->pairs)
            v4c_index_pack_bf16(qrow, a->H, D, qp);
        else
            widen(qrow, a->qdt, H * D, qf);
        widen(a->w + row * H * qesz, a->qdt, H, wf);
        for (int h = 0; h < H; h++) wf[h] *= a->scale; /* w.float() * (weight_scale * score_scale) */
        struct scan_job job = {qf, wf, qp, a->keys + b * a->N * D * kesz, a->H, a->D, a->kdt, a->pairs, total,
                               scratch};
        if (vis > 0) {
            if (a->threads > 1)
                v4c_parallel_rows(vis, a->threads, 256, scan_rows, &job);
            else
                scan_rows(&job, 0, vis, tid);
        }
        for (long j = 0; j < vis; j++) picks[j] = pick_of(total[j], (int)j);
        const long k = vis < a->topk ? vis : a->topk;
        pick_t *sel = (pick_t *)o; /* the output row holds the picks until their rows replace them */
        if (vis > k)
            select_radix(picks, vis, k, sel);
        else
            memcpy(sel, picks, k * sizeof(pick_t));
        const pick_t *sorted = sort_radix(sel, k, picks); /* (picks: free now, and holds vis >= k) */
        for (long s = 0; s < a->topk; s++) o[s] = s < k ? row_of(sorted[s]) : -1;
    }
}

/* q [B, T, H, D] and w [B, T, H] of dtype qdt; keys [B, N, D] of dtype kdt; pos [B, T]; out [B, T, topk].
 * `work` holds v4c_indexer_work(threads, H, D, N) bytes; `pairs` asks for attention_bf16.c's scores
 * (taken when q and keys are bf16 on a CPU that has them). A call of fewer query rows than threads
 * shares each query's rows among the threads, a larger one its queries; a key's score is the same
 * either way. Returns 0. */
int v4c_indexer_topk(int threads, long B, long T, int H, int D, int qdt, const void *q, const void *w, int kdt,
                     const void *keys, long N, const int64_t *pos, int ratio, float scale, int topk, int64_t *out,
                     int pairs, void *work) {
    struct topk_job a = {T, H, D, qdt, kdt, pairs && qdt == 1 && kdt == 1 && v4c_index_bf16(D), ratio, topk, threads,
                         threads, (const char *)q, (const char *)w, (const char *)keys, N, pos, scale, out, (char *)work};
    if (B * T < threads) {
        query_rows(&a, 0, B * T, 0);
    } else {
        a.threads = 1;
        v4c_parallel_rows(B * T, threads, 1, query_rows, &a);
    }
    return 0;
}
