/* RMSNorm then RoPE, in place, over the rows of a projection's output (q_proj / kv_proj epilogue).
 *
 * In PyTorch this epilogue is ~15 small ops per call (norm, widen, complex view, multiply, copy
 * back): most of a decode step's q/kv projection after its GEMV, and a dozen memory passes in a
 * prefill. Roundings follow the references: the norm's output is rounded to the tensor's dtype,
 * RoPE widens that, rotates (each product and sum rounded in fp32) and rounds again.
 * dtype codes: 0 = float32, 1 = bfloat16 (raw uint16 bits).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

static inline float rnd(float v, int dt) { return dt ? bf2f(f2bf(v)) : v; }

/* x: [rows, heads, d] (dtype xdt), normalised per head over d, times w [d] (dtype wdt; NULL: none),
 * then the last rope_dim dims of each head rotated as interleaved pairs by rot [rows, rope_dim/2]
 * (cos, sin) pairs. rows [r0, r1). buf: d floats of scratch. */
V4C_CLONES int v4c_norm_rope(long r0, long r1, int heads, int d, int xdt, void *x, const void *w, int wdt,
                             float eps, int rope_dim, const float *rot, float *buf) {
    if (rope_dim < 0 || rope_dim > d || rope_dim % 2) return -1;
    const int tail = d - rope_dim, half = rope_dim / 2;
    for (long r = r0; r < r1; r++) {
        const float *rr = rot ? rot + r * rope_dim : 0;
        for (int h = 0; h < heads; h++) {
            const long off = (r * heads + h) * (long)d;
            if (xdt) {
                const uint16_t *p = (const uint16_t *)x + off;
                for (int i = 0; i < d; i++) buf[i] = bf2f(p[i]);
            } else {
                memcpy(buf, (const float *)x + off, d * sizeof(float));
            }
            float ss = 0;
            for (int i = 0; i < d; i++) ss += buf[i] * buf[i];
            const float inv = 1.0f / sqrtf(ss / (float)d + eps);
            for (int i = 0; i < d; i++) {
                float v = buf[i] * inv;
                if (w) v *= wdt ? bf2f(((const uint16_t *)w)[i]) : ((const float *)w)[i];
                buf[i] = rnd(v, xdt);
            }
            if (rr)
                for (int i = 0; i < half; i++) {
                    const float a = buf[tail + 2 * i], b = buf[tail + 2 * i + 1];
                    const float c = rr[2 * i], s = rr[2 * i + 1];
                    const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
                    buf[tail + 2 * i] = rnd(ac - bs, xdt);
                    buf[tail + 2 * i + 1] = rnd(as + bc, xdt);
                }
            if (xdt) {
                uint16_t *p = (uint16_t *)x + off;
                for (int i = 0; i < d; i++) p[i] = f2bf(buf[i]);
            } else {
                memcpy((float *)x + off, buf, d * sizeof(float));
            }
        }
    }
    return 0;
}
