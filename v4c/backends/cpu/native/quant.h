/* What quant.c and quant_bf16.c share: the release formats' scalar decodings and quant_bf16.c's entry points. */
#ifndef V4C_NATIVE_QUANT_H
#define V4C_NATIVE_QUANT_H

#include <stdint.h>
#include <string.h>

/* 2^(e - 128) for an e8m0 byte e: an MXFP4 block's scale halved (the decode table holds 2 x e2m1);
 * byte 255 is NaN, as the reference decodes it. A table, so the kernel's broadcast is a load. */
#define MXS(e) ((e) == 255 ? 0x7FC00000u : (e) >= 2 ? (uint32_t)((e) - 1) << 23 : 0x00200000u << ((e) & 1))
#define MXS4(e) MXS(e), MXS((e) + 1), MXS((e) + 2), MXS((e) + 3)
#define MXS16(e) MXS4(e), MXS4((e) + 4), MXS4((e) + 8), MXS4((e) + 12)
#define MXS64(e) MXS16(e), MXS16((e) + 16), MXS16((e) + 32), MXS16((e) + 48)
static const union {
    uint32_t u[256];
    float f[256];
} MX_HALF = {{MXS64(0), MXS64(64), MXS64(128), MXS64(192)}};

/* 2^(e - 127) for an e8m0 byte (255: NaN) */
static inline float e8m0f(uint8_t e) {
    const uint32_t bits = e == 255 ? 0x7FC00000u : e ? (uint32_t)e << 23 : 0x00400000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* an e4m3 byte's value (no NaN: the format's one NaN code decodes as 480) */
static inline float e4m3f(uint8_t b) {
    const uint32_t bits = ((uint32_t)(b & 0x80u) << 24) | ((uint32_t)(b & 0x7Fu) << 20);
    float f;
    memcpy(&f, &bits, 4);
    return f * 0x1p120f;
}

/* quant_bf16.c: the MXFP4 product and the FP8 rows' on AVX512-BF16 (bf16 token rows: the MXFP4 kernel's in the
 * natural order, the FP8 kernel's scaled as quant.c scales them), and whether this CPU runs them */
void v4c_mx_dots_bf16(const uint8_t *W, const uint8_t *Sc, long N, long K, const uint16_t *const *x, int c, float *Y,
                      long ldy);
void v4c_dots_bf16_e4m3(const void *W, long N, long K, const void *const *x, int c, float *Y, long ldy);
int v4c_quant_bf16_supported(void);

/* the smallest e8m0 block scale of an FP8 row block that quant_bf16.c's kernel takes (see there) */
#define FP8_BF16_MIN_SCALE 41

#endif
