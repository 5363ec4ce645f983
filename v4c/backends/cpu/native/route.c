/* The MoE router after its product, for a decode call's few tokens: what moe_router's reference
 * (graph/ops/fused.py) does with its scores in ten PyTorch calls, in one C loop (each of those calls
 * costs more dispatch than its arithmetic on t <= 16 rows of E scores).
 *
 * For each of t tokens: its k experts (the k largest score + bias, or its row of the hash table),
 * their weights (the chosen scores, divided by their sum + 1e-20, times `scaling`: the reference's
 * two fp32 roundings), then every assignment grouped by expert: perm, a stable counting sort of the
 * t * k expert ids (the reference's stable sort gives the same permutation), and offsets[e], the
 * assignments to experts below e. A token's experts are listed best first; the reference's top-k
 * leaves their order unspecified, and nothing downstream depends on it beyond the order of sums. */
#include <math.h>
#include <stdint.h>

static int better(float v, long e, float bv, long be) {
    if (be < 0) return 1;
    if (isnan(v) != isnan(bv)) return isnan(v); /* NaN sorts above every number, as topk's order */
    return v > bv || (v == bv && e < be);
}

/* Returns 0, or -1 when a hashed token's id lies outside the table (its index in *bad), or -2 when a
 * table entry names no expert (its flat index in the table in *bad). */
int v4c_moe_route(long t, int E, int k, const float *scores, const float *bias, const void *table, int table_i64,
                  long V, const int64_t *ids, float scaling, int64_t *idx, float *wts, int64_t *perm,
                  int64_t *offsets, long *bad) {
    for (long r = 0; r < t; r++) {
        const float *s = scores + r * E;
        int64_t *ix = idx + r * k;
        if (table) {
            const long id = ids[r] < 0 ? 0 : (long)ids[r]; /* a padding row's id (-1) reads row 0 */
            if (id >= V) {
                *bad = r;
                return -1;
            }
            for (int j = 0; j < k; j++) {
                const long at = id * k + j;
                const int64_t e = table_i64 ? ((const int64_t *)table)[at] : ((const int32_t *)table)[at];
                if (e < 0 || e >= E) {
                    *bad = at;
                    return -2;
                }
                ix[j] = e;
            }
        } else {
            for (int j = 0; j < k; j++) { /* k passes of a selection: k and E are small */
                long be = -1;
                float bv = 0.f;
                for (long e = 0; e < E; e++) {
                    int taken = 0;
                    for (int q = 0; q < j && !taken; q++) taken = ix[q] == e;
                    const float v = s[e] + bias[e];
                    if (!taken && better(v, e, bv, be)) be = e, bv = v;
                }
                ix[j] = be;
            }
        }
        float sum = 0.f;
        for (int j = 0; j < k; j++) sum += s[ix[j]];
        const float den = sum + 1e-20f;
        for (int j = 0; j < k; j++) wts[r * k + j] = s[ix[j]] / den * scaling;
    }
    for (int e = 0; e <= E; e++) offsets[e] = 0;
    for (long a = 0; a < t * k; a++) offsets[idx[a] + 1]++;
    for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    /* each expert's next free slot, filled in assignment order: a stable sort */
    for (long a = 0; a < t * k; a++) perm[offsets[idx[a]]++] = a;
    for (int e = E; e > 0; e--) offsets[e] = offsets[e - 1]; /* the slots moved each start to the next's */
    offsets[0] = 0;
    return 0;
}

/* x[i] = sqrt(softplus(x[i])) for i < n (the router's scoring, sqrtsoftplus), in place, one element at
 * a time: the same bits for a score whatever else the call holds. PyTorch's softplus does not promise
 * that: on an AVX-512 CPU a row of 16 scores came out one ulp apart alone and beside a second row,
 * which moved a routing weight, and a bf16 speculative decode's tokens away from plain decoding's.
 * softplus as PyTorch defines it (beta 1, threshold 20): x above 20, else log1p(exp(x)). */
void v4c_sqrt_softplus(float *x, long n) {
    for (long i = 0; i < n; i++) x[i] = sqrtf(x[i] > 20.f ? x[i] : log1pf(expf(x[i])));
}
