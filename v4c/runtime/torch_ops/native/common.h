/* Shared by the C helpers: bf16 <-> fp32 and the AVX2 clone attribute. */
#ifndef V4C_NATIVE_COMMON_H
#define V4C_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

/* x86-64 Linux: the row kernels also get an AVX2 build, picked at load time by the CPU's features
 * (the library stays runnable on any x86-64 CPU). The clone is named by feature, not "arch=haswell":
 * an arch clone is dispatched on the CPU model, so AMD CPUs with AVX2 were given the SSE2 build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define V4C_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define V4C_CLONES
/* fn(ctx, r0, r1, tid) over [0, rows) split into at most `threads` ranges of at least `grain` rows,
 * run by PyTorch's OpenMP team when there is one (parallel.c); tid < threads indexes scratch */
typedef void (*v4c_rows_fn)(void *ctx, long r0, long r1, int tid);
void v4c_parallel_rows(long rows, int threads, long grain, v4c_rows_fn fn, void *ctx);

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

/* fn(ctx, r0, r1, tid) over [0, rows) split into at most `threads` ranges of at least `grain` rows,
 * run by PyTorch's OpenMP team when there is one (parallel.c); tid < threads indexes scratch */
typedef void (*v4c_rows_fn)(void *ctx, long r0, long r1, int tid);
void v4c_parallel_rows(long rows, int threads, long grain, v4c_rows_fn fn, void *ctx);

#endif
