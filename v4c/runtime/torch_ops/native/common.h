/* Shared by the C helpers: bf16 <-> fp32 and the AVX2 clone attribute. */
#ifndef V4C_NATIVE_COMMON_H
#define V4C_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

/* x86-64 Linux: the row kernels also get an AVX2 build, picked at load time by the CPU's features
 * (the library stays runnable on any x86-64 CPU) */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define V4C_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define V4C_CLONES
#endif

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded); /* a select: vectorises */
}

#endif
