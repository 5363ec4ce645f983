/* The dot-product kernels (dots.c), as their callers (moe.c, linear.c, attention.c) see them, and which
 * instruction sets this build can target. */
#ifndef V4C_NATIVE_DOTS_H
#define V4C_NATIVE_DOTS_H

#if defined(__GNUC__) && defined(__x86_64__)
#define V4C_X86 1
#else
#define V4C_X86 0
#endif
#if V4C_X86 && (defined(__clang__) || __GNUC__ >= 11)
#define V4C_BF16DOT 1 /* the compiler knows AVX512-BF16 (intrinsics and the CPU-feature name) */
#else
#define V4C_BF16DOT 0
#endif

/* Instruction sets a kernel is built for. AVX512VL: AVX2's kernels (8 lanes, the same sums in the same
 * order, so the same bits) with AVX-512's 32 registers for bigger blocks. */
enum { V4C_ISA_NONE = 0, V4C_ISA_AVX2 = 1, V4C_ISA_AVX512F = 2, V4C_ISA_AVX512BF16 = 3, V4C_ISA_AVX512VL = 4 };

/* Y[r * ldy + o] = dot(W row o, token row x[r]) for o < N, r < c: W [N, K] row-major, each row read
 * from memory once whatever c is. Token rows are fp32, or bf16 bits for an AVX512-BF16 kernel. */
typedef void (*v4c_dots_fn)(const void *W, long N, long K, const void *const *x, int c, float *Y, long ldy);

/* Whether this CPU runs code of instruction set `isa` (the OS saves its registers too). */
int v4c_isa_supported(int isa);

/* The kernel for weights of dtype wdt (0 fp32, 1 bf16, 2 fp16) in instruction set `isa`, or NULL when none
 * is built (AVX512-BF16 takes only bf16 weights; fp16 needs F16C); *x_bf16 says whether it wants bf16 token
 * rows (else fp32). */
v4c_dots_fn v4c_dots_kernel(int isa, int wdt, int *x_bf16);

/* The best instruction set this CPU has a kernel for, for weights of dtype wdt; V4C_ISA_NONE if none. */
int v4c_best_isa(int wdt);

#endif
