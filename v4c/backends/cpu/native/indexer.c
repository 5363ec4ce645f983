/* The lightning indexer's selection for a decode call over plain (fp32 / bf16) compressed keys: per
 * query, score every compressed row complete at its position, sum_h w_h * relu(q_h . k_j) (w already
 * times the two scales), and keep the top k. The PyTorch path widened the whole key cache to fp32,
 * ran two batched products, a mask, top-k and two fixes on its output: a dozen calls and a copy of
 * the cache per call. Here each key row is widened once into a small buffer and met by every head
 * (dots(): fp32 dot products, eight lanes), rows split across threads; then a quickselect and a sort
 * of the k chosen, best first, ties to the lower row (the reference's top-k leaves ties unordered).
 * Rows not visible, and picks beyond the visible rows, read -1. dt codes: 0 fp32, 1 bf16. */
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

struct pick {
    float v;
    int j;
};

static int above(const struct pick *a, const struct pick *b) { return a->v > b->v || (a->v == b->v && a->j < b->j); }

static int by_rank(const void *a, const void *b) {
    return above((const struct pick *)a, (const struct pick *)b) ? -1 : above((const struct pick *)b, (const struct pick *)a);
}

/* p[0 .. k) become the k best of p[0 .. n) (in no order) */
static void select_top(struct pick *p, long n, long k) {
    long lo = 0, hi = n - 1;
    while (lo < hi) {
        const struct pick pivot = p[lo + (hi - lo) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (above(&p[i], &pivot)) i++;
            while (above(&pivot, &p[j])) j--;
            if (i <= j) {
                const struct pick t = p[i];
                p[i++] = p[j];
                p[j--] = t;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

struct scan_job {
    const float *q, *w; /* one query: [H, D] fp32, [H] */
    const char *keys;   /* [n, D] of dtype kdt */
    int H, D, kdt;
    float *total;   /* [n] */
    float *scratch; /* per thread: D + H floats */
};

V4C_CLONES static void scan_rows(void *ctx, long j0, long j1, int tid) {
    const struct scan_job *s = (const struct scan_job *)ctx;
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

long v4c_indexer_work(int threads, int H, int D, long n) {
    return (long)threads * (D + H) * 4 + n * (4 + (long)sizeof(struct pick)) + (long)(H * D + H) * 4;
}

/* q [B, T, H, D] and w [B, T, H] of dtype qdt; keys [B, N, D] of dtype kdt; pos [B, T]; out [B, T, topk].
 * `work` holds v4c_indexer_work(threads, H, D, N) bytes. Returns 0. */
int v4c_indexer_topk(int threads, long B, long T, int H, int D, int qdt, const void *q, const void *w, int kdt,
                     const void *keys, long N, const int64_t *pos, int ratio, float scale, int topk, int64_t *out,
                     void *work) {
    const long qesz = qdt ? 2 : 4, kesz = kdt ? 2 : 4;
    char *base = (char *)work;
    float *scratch = (float *)base;
    base += (long)threads * (D + H) * 4;
    float *qf = (float *)base, *wf = qf + (long)H * D;
    base += (long)(H * D + H) * 4;
    float *total = (float *)base;
    base += N * 4;
    struct pick *picks = (struct pick *)base;
    for (long b = 0; b < B; b++)
        for (long i = 0; i < T; i++) {
            const long row = b * T + i;
            int64_t *o = out + row * topk;
            const int64_t p = pos[row];
            long vis = p < 0 ? 0 : (long)((p + 1) / ratio);
            if (vis > N) vis = N;
            widen((const char *)q + row * (long)H * D * qesz, qdt, (long)H * D, qf);
            widen((const char *)w + row * (long)H * qesz, qdt, H, wf);
            for (int h = 0; h < H; h++) wf[h] *= scale; /* w.float() * (weight_scale * score_scale) */
            struct scan_job job = {qf, wf, (const char *)keys + b * N * D * kesz, H, D, kdt, total, scratch};
            if (vis > 0) v4c_parallel_rows(vis, threads, 256, scan_rows, &job);
            for (long j = 0; j < vis; j++) picks[j] = (struct pick){total[j], (int)j};
            const long k = vis < topk ? vis : topk;
            if (vis > k) select_top(picks, vis, k);
            qsort(picks, (size_t)k, sizeof(struct pick), by_rank);
            for (long s = 0; s < topk; s++) o[s] = s < k ? picks[s].j : -1;
        }
    return 0;
}
