// What the operator files (ops.cpp, ops_products.cpp) share: their operand checks (every error names the
// operand, never a crash), the per-thread scratch buffer, the thread count, and the instruction-set names of
// the dot-product kernels. Inline, in one named namespace: `scratch`'s buffer is one per thread whichever
// file calls it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace v4c_native_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- operand checks -----------------------------------------------------------------------------------

// dtype code of the C helpers: 0 float32, 1 bfloat16, 2 float16
inline int float_code(const Tensor &t, const char *op, const char *name) {
    const auto st = t.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "v4c_native.", op, ": ", name,
                     " must be float32, bfloat16 or float16, got ", st);
    return st == at::kBFloat16 ? 1 : st == at::kHalf ? 2 : 0;
}

inline void check_plain(const Tensor &t, const char *op, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "v4c_native.", op, ": ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), "v4c_native.", op, ": ", name, " must be contiguous");
}

inline void check_dtype(const Tensor &t, at::ScalarType want, const char *op, const char *name) {
    TORCH_CHECK_TYPE(t.scalar_type() == want, "v4c_native.", op, ": ", name, " must be ", want, ", got ",
                     t.scalar_type());
}

inline void check_numel(const Tensor &t, int64_t want, const char *op, const char *name, const char *shape) {
    TORCH_CHECK_VALUE(t.numel() == want, "v4c_native.", op, ": ", name, " must hold ", shape, " = ", want,
                      " elements, got shape ", t.sizes());
}

inline void check_fits_int(int64_t v, const char *op, const char *what) {
    TORCH_CHECK_VALUE(v >= 0 && v <= INT32_MAX, "v4c_native.", op, ": ", what, " ", v, " is out of range");
}

// an fp32 contiguous CPU copy of a float operand (the operand itself when it already is one)
inline Tensor as_f32(const Tensor &t, const char *op, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "v4c_native.", op, ": ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "v4c_native.", op, ": ", name,
                     " must be a floating-point tensor, got ", t.scalar_type());
    if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t; // (no dispatch at all: decode calls are short)
    return t.to(at::kFloat).contiguous();
}

inline const void *ptr(const OptTensor &t) { return t.has_value() ? t->data_ptr() : nullptr; }

// this thread's scratch of at least n floats, kept across calls
inline float *scratch(int64_t n) {
    thread_local std::unique_ptr<float[]> buf;
    thread_local int64_t held = 0;
    if (held < n) {
        buf.reset(new float[n]);
        held = n;
    }
    return buf.get();
}

inline int threads() { return std::max(1, at::get_num_threads()); }

// ---- the dot-product kernels' instruction sets (ops_products.cpp) -----------------------------------

// the instruction sets this CPU runs the dot-product kernels with for weights of `dtype`, best first
std::vector<std::string> dot_isas(at::ScalarType dtype);

// the instruction set a caller named (-1: the best there is), checked against this CPU
int pick_isa(const std::optional<c10::string_view> &isa_arg, at::ScalarType dtype, const char *op);

// ---- shared between the operator files -------------------------------------------------------------

// ``x @ w.T`` by the dot-product kernels (linear.c), as the ``linear`` operator computes it (ops_products.cpp)
Tensor dense_linear(const Tensor &x, const Tensor &w);

} // namespace v4c_native_ops
