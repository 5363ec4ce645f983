/* RMSNorm then RoPE, in place, over the rows of a projection's output (q_proj / kv_proj epilogue);
 * RoPE alone (the attention output's de-rotation, the indexer's queries).
 *
 * In PyTorch this epilogue is ~15 small ops per call (norm, widen, complex view, multiply, copy
 * back): most of a decode step's q/kv projection after its GEMV, and a dozen memory passes in a
 * prefill. Roundings follow the references: the norm's output is rounded to the tensor's dtype,
 * RoPE widens that, rotates (each product and sum rounded in fp32) and rounds again.
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16 (raw uint16 bits). Each entry point runs loops
 * compiled for one row dtype (a constant xdt after inlining): with the dtype a runtime value the bf16 loops
 * ran at about half the speed once fp16's conversions were among the cases (2.4 -> 4-5.5 us for 8 heads of
 * 128 in a bf16 decode call).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

/* (a + ib)(c + is), each product and the two sums rounded in fp32 as PyTorch's complex product does */
static inline void rotate(float a, float b, float c, float s, float *re, float *im) {
    const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
    *re = ac - bs;
    *im = as + bc;
}

/* x: [rows, heads, d] (dtype xdt), normalised per head over d, times w [d] (dtype wdt; NULL: none),
 * then the last rope_dim dims of each head rotated as interleaved pairs by rot [rows, rope_dim/2]
 * (cos, sin) pairs. rows [r0, r1). buf: d floats of scratch. */
static inline __attribute__((always_inline)) void norm_rope_rows(long r0, long r1, int heads, int d, const int xdt,
                                                                 void *x, const void *w, int wdt, float eps,
                                                                 int rope_dim, const float *rot, float *buf) {
    const int tail = d - rope_dim, half = rope_dim / 2;
    for (long r = r0; r < r1; r++) {
        const float *rr = rot ? rot + r * rope_dim : 0;
        for (int h = 0; h < heads; h++) {
            const long off = (r * heads + h) * (long)d;
            if (xdt) {
                const uint16_t *p = (const uint16_t *)x + off;
                for (int i = 0; i < d; i++) buf[i] = half_to_f(p[i], xdt);
            } else {
                memcpy(buf, (const float *)x + off, d * sizeof(float));
            }
            float ss = 0;
            for (int i = 0; i < d; i++) ss += buf[i] * buf[i];
            const float inv = 1.0f / sqrtf(ss / (float)d + eps);
            for (int i = 0; i < d; i++) {
                float v = buf[i] * inv;
                if (w) v *= wdt ? half_to_f(((const uint16_t *)w)[i], wdt) : ((const float *)w)[i];
                buf[i] = round_to(v, xdt);
            }
            if (rr)
                for (int i = 0; i < half; i++) {
                    float re, im;
                    rotate(buf[tail + 2 * i], buf[tail + 2 * i + 1], rr[2 * i], rr[2 * i + 1], &re, &im);
                    buf[tail + 2 * i] = round_to(re, xdt);
                    buf[tail + 2 * i + 1] = round_to(im, xdt);
                }
            if (xdt) {
                uint16_t *p = (uint16_t *)x + off;
                for (int i = 0; i < d; i++) p[i] = f_to_half(buf[i], xdt);
            } else {
                memcpy((float *)x + off, buf, d * sizeof(float));
            }
        }
    }
}

/* RoPE alone (no norm): the last rope_dim dims of each head of rows [r0, r1), in place. Each value
 * is widened, rotated (products and their sum each rounded in fp32) and rounded to xdt once, as the
 * PyTorch rope on a widened copy does. */
static inline __attribute__((always_inline)) void rope_rows(long r0, long r1, int heads, int d, const int xdt,
                                                            void *x, int rope_dim, const float *rot) {
    const int tail = d - rope_dim, half = rope_dim / 2;
    for (long r = r0; r < r1; r++) {
        const float *rr = rot + r * rope_dim;
        for (int h = 0; h < heads; h++) {
            const long off = (r * heads + h) * (long)d + tail;
            for (int i = 0; i < half; i++) {
                float a, b;
                if (xdt) {
                    const uint16_t *p = (const uint16_t *)x + off;
                    a = half_to_f(p[2 * i], xdt), b = half_to_f(p[2 * i + 1], xdt);
                } else {
                    const float *p = (const float *)x + off;
                    a = p[2 * i], b = p[2 * i + 1];
                }
                float re, im;
                rotate(a, b, rr[2 * i], rr[2 * i + 1], &re, &im);
                if (xdt) {
                    uint16_t *p = (uint16_t *)x + off;
                    p[2 * i] = f_to_half(re, xdt), p[2 * i + 1] = f_to_half(im, xdt);
                } else {
                    float *p = (float *)x + off;
                    p[2 * i] = re, p[2 * i + 1] = im;
                }
            }
        }
    }
}

V4C_CLONES static void norm_rope_range(long r0, long r1, int heads, int d, int xdt, void *x, const void *w, int wdt,
                                       float eps, int rope_dim, const float *rot, float *buf) {
    if (xdt == 1)
        norm_rope_rows(r0, r1, heads, d, 1, x, w, wdt, eps, rope_dim, rot, buf);
    else if (xdt == 2)
        norm_rope_rows(r0, r1, heads, d, 2, x, w, wdt, eps, rope_dim, rot, buf);
    else
        norm_rope_rows(r0, r1, heads, d, 0, x, w, wdt, eps, rope_dim, rot, buf);
}

V4C_CLONES static void rope_range(long r0, long r1, int heads, int d, int xdt, void *x, int rope_dim,
                                  const float *rot) {
    if (xdt == 1)
        rope_rows(r0, r1, heads, d, 1, x, rope_dim, rot);
    else if (xdt == 2)
        rope_rows(r0, r1, heads, d, 2, x, rope_dim, rot);
    else
        rope_rows(r0, r1, heads, d, 0, x, rope_dim, rot);
}

struct norm_rope_job {
    int norm, heads, d, xdt, wdt, rope_dim;
    void *x;
    const void *w;
    float eps;
    const float *rot;
    float *work;
};

static void norm_rope_job_rows(void *p, long a, long e, int tid) {
    const struct norm_rope_job *j = (const struct norm_rope_job *)p;
    if (!j->norm) {
        rope_range(a, e, j->heads, j->d, j->xdt, j->x, j->rope_dim, j->rot);
        return;
    }
    norm_rope_range(a, e, j->heads, j->d, j->xdt, j->x, j->w, j->wdt, j->eps, j->rope_dim, j->rot,
                    j->work + (long)tid * j->d);
}

/* norm_rope_range (norm = 0: rope_range, which needs rot) over [0, rows), split across up to
 * `threads` threads (64 rows or more each). work: threads * d floats. Returns 0, or -1 for a
 * rope_dim that is odd or larger than d, or no rotations without the norm. */
int v4c_norm_rope(int threads, int norm, long rows, int heads, int d, int xdt, void *x, const void *w, int wdt,
                  float eps, int rope_dim, const float *rot, float *work) {
    if (rope_dim < 0 || rope_dim > d || rope_dim % 2 || (!norm && !rot)) return -1;
    struct norm_rope_job j = {norm, heads, d, xdt, wdt, rope_dim, x, w, eps, rot, work};
    v4c_parallel_rows(rows, threads, 64, norm_rope_job_rows, &j);
    return 0;
}
