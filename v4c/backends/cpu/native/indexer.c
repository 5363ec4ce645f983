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

/* Hoare's partition of p[*i .. *j] around its middle pick: after it, p[.. *j] <= pivot <= p[*i ..] */
static inline void partition(pick_t *p, long *i_, long *j_) {
    long i = *i_, j = *j_;
    const pick_t pivot = p[i + (j - i) / 2];
    while (i <= j) {
        while (p[i] < pivot) i++;
        while (pivot < p[j]) j--;
        if (i <= j) {
            const pick_t t = p[i];
            p[i++] = p[j];
            p[j--] = t;
        }
    }
    *i_ = i;
    *j_ = j;
}

/* p[0 .. k) become the k smallest of p[0 .. n) (in no order): the picks are distinct */
static void select_top(pick_t *p, long n, long k) {
    long lo = 0, hi = n - 1;
    while (lo < hi) {
        long i = lo, j = hi;
        partition(p, &i, &j);
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* p[0 .. n) ascending: quicksort on a middle pivot, insertion sort below 16 */
static void sort_picks(pick_t *p, long n) {
    while (n > 16) {
        long i = 0, j = n - 1;
        partition(p, &i, &j);
        if (j + 1 < n - i) { /* the smaller side by recursion, the larger in this loop */
            sort_picks(p, j + 1);
            p += i;
            n -= i;
        } else {
            sort_picks(p + i, n - i);
            n = j + 1;
        }
    }
    for (long a = 1; a < n; a++) {
        const pick_t t = p[a];
        long b = a;
        for (; b > 0 && t < p[b - 1]; b--) p[b] = p[b - 1];
        p[b] = t;
    }
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
        if (vis > k) select_top(picks, vis, k);
        sort_picks(picks, k);
        for (long s = 0; s < a->topk; s++) o[s] = s < k ? row_of(picks[s]) : -1;
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
