// The dot-product kernels' operators (dots.c and its callers): the instruction sets by name, the MoE over
// plain (moe.c) and quantised (quant.c) experts, the dense products (linear.c) and the router's steps after
// its product (route.c). Registered as a fragment of the `v4c_native` library ops.cpp defines.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

extern "C" {
int v4c_isa_supported(int isa);
int v4c_best_isa(int wdt);
typedef void (*v4c_dots_fn)(const void *W, long N, long K, const void *const *x, int c, float *Y, long ldy);
v4c_dots_fn v4c_dots_kernel(int isa, int wdt, int *x_bf16);
long v4c_moe_decode_work(int t, int D, int I, int Is, int k, int E);
int v4c_moe_decode(int threads, int isa, int dt, int t, int D, int I, int Is, int k, int E, const void *x,
                   const int64_t *offsets, const int64_t *perm, const float *w, const void *w13, const void *w2,
                   const void *sg, const void *su, const void *sd, float limit, void *out, void *work);
long v4c_linear_work(int t, int G, long K, long N);
int v4c_linear(int threads, int isa, int dt, int t, int G, long R, long K, const void *x, const void *W, void *out,
               void *work);
void v4c_sqrt_softplus(float *x, long n);
int v4c_moe_route(long t, int E, int k, const float *scores, const float *bias, const void *table, int table_i64,
                  long V, const int64_t *ids, float scaling, int64_t *idx, float *wts, int64_t *perm,
                  int64_t *offsets, long *bad);
int v4c_quant_supported(void);
int v4c_quant_isa_supported(int isa);
long v4c_qlinear_work(int threads, int t, int G, long K, long N);
int v4c_qlinear(int threads, int isa, int fmt, int dt, int t, int G, long R, long K, const void *x, const void *W,
                const uint8_t *S, void *out, void *work);
long v4c_moe_decode_q_work(int threads, int t, int D, int I, int Is, int k, int E);
int v4c_moe_decode_q(int threads, int isa, int dt, int t, int D, int I, int Is, int k, int E, const void *x,
                     const int64_t *offsets, const int64_t *perm, const float *w, int fmt, const void *w13,
                     const uint8_t *w13s, const void *w2, const uint8_t *w2s, int sfmt, const void *sg,
                     const uint8_t *sgs, const void *su, const uint8_t *sus, const void *sd, const uint8_t *sds,
                     float limit, void *out, void *work);
}

namespace v4c_native_ops {

// the dot-product kernels' instruction sets (dots.h), by name, and the order dot_isas lists them in
const char *const ISA_NAMES[] = {"", "avx2", "avx512f", "avx512bf16", "avx512vl"};
constexpr int N_ISAS = 5;
constexpr int ISA_ORDER[] = {3, 2, 4, 1}; // avx512bf16, avx512f, avx512vl, avx2

std::vector<std::string> dot_isas(at::ScalarType dtype) {
    std::vector<std::string> out;
    if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) return out;
    const int dt = dtype == at::kBFloat16 ? 1 : dtype == at::kHalf ? 2 : 0;
    const int best = v4c_best_isa(dt); // (the kernels' own pick, first: not always the widest, see dots.c)
    if (best > 0) out.push_back(ISA_NAMES[best]);
    int x_bf16;
    for (int isa : ISA_ORDER)
        if (isa != best && v4c_isa_supported(isa) && v4c_dots_kernel(isa, dt, &x_bf16)) out.push_back(ISA_NAMES[isa]);
    return out;
}

int pick_isa(const std::optional<c10::string_view> &isa_arg, at::ScalarType dtype, const char *op) {
    const auto have = dot_isas(dtype);
    int isa = -1;
    if (isa_arg.has_value()) {
        const std::string want(isa_arg->data(), isa_arg->size());
        for (int i = 1; i < N_ISAS; i++)
            if (want == ISA_NAMES[i]) isa = i;
        TORCH_CHECK_VALUE(isa > 0, "v4c_native.", op, ": unknown instruction set '", want,
                          "' (avx2, avx512vl, avx512f, avx512bf16)");
        TORCH_CHECK(std::find(have.begin(), have.end(), want) != have.end(), "v4c_native.", op,
                    ": this CPU (or compiler) has no ", want, " kernel for ", dtype, " weights");
    }
    TORCH_CHECK(!have.empty(), "v4c_native.", op, ": this CPU (or compiler) has neither AVX2 + FMA nor AVX-512F");
    return isa;
}

} // namespace v4c_native_ops

using namespace v4c_native_ops;

namespace {

// the routing operands of both MoE kernels: perm [t * k] and offsets [E + 1] as plain int64, the
// assignments' weights [t * k] (returned as fp32)
Tensor check_routing(const Tensor &perm, const Tensor &offsets, const Tensor &w, int64_t t, int64_t k, int64_t E,
                     const char *op) {
    check_dtype(perm, at::kLong, op, "perm");
    check_plain(perm, op, "perm");
    check_dtype(offsets, at::kLong, op, "offsets");
    check_plain(offsets, op, "offsets");
    check_numel(offsets, E + 1, op, "offsets", "[E + 1]");
    Tensor w32 = as_f32(w, op, "w");
    check_numel(w32, t * k, op, "w", "[t * k]");
    check_numel(perm, t * k, op, "perm", "[t * k]");
    return w32;
}

// every index the MoE kernels follow: each expert's assignment range within perm, each slot within w and x
void check_indices(const Tensor &perm, const Tensor &offsets, int64_t t, int64_t k, int64_t E, const char *op) {
    const int64_t *off = offsets.data_ptr<int64_t>(), *pm = perm.data_ptr<int64_t>();
    for (int64_t e = 0; e < E; e++)
        TORCH_CHECK_VALUE(off[e] <= off[e + 1], "moe_ffn: expert offsets must be non-decreasing, got ", offsets);
    TORCH_CHECK_VALUE(off[0] >= 0 && off[E] <= perm.numel(), "v4c_native.", op, ": offsets must lie in [0, ",
                      perm.numel(), "], got ", off[0], " .. ", off[E]);
    for (int64_t a = 0; a < t * k; a++)
        TORCH_CHECK_VALUE(pm[a] >= 0 && pm[a] < t * k, "v4c_native.", op, ": perm[", a, "] = ", pm[a],
                          " is outside [0, ", t * k, ")");
}

Tensor moe_decode(const Tensor &x, const Tensor &w, const Tensor &perm, const Tensor &offsets, const Tensor &w13,
                  const Tensor &w2, const OptTensor &shared_gate, const OptTensor &shared_up,
                  const OptTensor &shared_down, int64_t k, double limit, std::optional<c10::string_view> isa_arg) {
    const char *op = "moe_decode";
    const int dt = float_code(x, op, "x");
    check_plain(x, op, "x");
    auto same = [&](const Tensor &t, const char *name) {
        check_dtype(t, x.scalar_type(), op, name);
        check_plain(t, op, name);
    };
    // (token rows in any leading shape: [t, D] or a call's [B, T, D]; the result has x's shape)
    TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(-1) >= 1, "v4c_native.moe_decode: x must be [..., D] token rows, got shape ",
                      x.sizes());
    const int64_t D = x.size(-1), t = x.numel() / D;
    TORCH_CHECK_VALUE(k >= 1, "v4c_native.moe_decode: k must be at least 1, got ", k);
    same(w13, "w13");
    same(w2, "w2");
    TORCH_CHECK_VALUE(w2.dim() == 3 && w2.size(1) == D, "v4c_native.moe_decode: w2 must be [E, D, I] with D = ", D,
                      ", got shape ", w2.sizes());
    const int64_t E = w2.size(0), I = w2.size(2);
    TORCH_CHECK_VALUE(w13.dim() == 3 && w13.size(0) == E && w13.size(1) == 2 * I && w13.size(2) == D,
                      "v4c_native.moe_decode: w13 must be [E, 2I, D] = [", E, ", ", 2 * I, ", ", D, "], got shape ",
                      w13.sizes());
    TORCH_CHECK_VALUE(t >= 1 && D >= 1 && I >= 1 && E >= 1, "v4c_native.moe_decode: empty operand (t ", t, ", D ", D,
                      ", I ", I, ", E ", E, ")");
    for (int64_t v : {t, D, I, E, k}) check_fits_int(v, op, "size");
    Tensor w32 = check_routing(perm, offsets, w, t, k, E, op);
    const bool shared = shared_gate.has_value();
    TORCH_CHECK_VALUE(shared == shared_up.has_value() && shared == shared_down.has_value(), "v4c_native.", op,
                      ": the shared expert needs all of gate, up and down, or none");
    int64_t Is = 0;
    if (shared) {
        same(*shared_gate, "shared_gate");
        same(*shared_up, "shared_up");
        same(*shared_down, "shared_down");
        Is = shared_gate->size(0);
        TORCH_CHECK_VALUE(Is >= 1, "v4c_native.moe_decode: shared_gate must be [Is, D] with Is >= 1, got shape ",
                          shared_gate->sizes());
        check_fits_int(Is, op, "shared width");
        check_numel(*shared_gate, Is * D, op, "shared_gate", "[Is, D]");
        check_numel(*shared_up, Is * D, op, "shared_up", "[Is, D]");
        check_numel(*shared_down, D * Is, op, "shared_down", "[D, Is]");
    }
    check_indices(perm, offsets, t, k, E, op);
    // (after the operand checks: those run, and are tested, on any CPU)
    const int isa = pick_isa(isa_arg, x.scalar_type(), op);
    Tensor out = at::empty_like(x);
    const int64_t work = v4c_moe_decode_work(int(t), int(D), int(I), int(Is), int(k), int(E));
    const int rc = v4c_moe_decode(threads(), isa, dt, int(t), int(D), int(I), int(Is), int(k), int(E), x.data_ptr(),
                                  offsets.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), w32.data_ptr<float>(),
                                  w13.data_ptr(), w2.data_ptr(), ptr(shared_gate), ptr(shared_up), ptr(shared_down),
                                  float(limit), out.data_ptr(),
                                  scratch(work / int64_t(sizeof(float)) + 16));
    TORCH_CHECK_VALUE(rc != -1, "v4c_native.moe_decode: bad sizes");
    TORCH_CHECK(rc != -3, "v4c_native.moe_decode: this CPU (or compiler) has no kernel for these weights");
    return out;
}

Tensor linear(const Tensor &x, const Tensor &w, int64_t groups, std::optional<c10::string_view> isa_arg) {
    const char *op = "linear";
    const int dt = float_code(x, op, "x");
    check_plain(x, op, "x");
    check_dtype(w, x.scalar_type(), op, "w");
    check_plain(w, op, "w");
    TORCH_CHECK_VALUE(groups >= 1, "v4c_native.linear: groups must be at least 1, got ", groups);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) % groups == 0 && w.size(0) >= groups && w.size(1) >= 1,
                      "v4c_native.linear: w must be [groups * R, K] with groups = ", groups, ", got shape ", w.sizes());
    const int64_t K = w.size(1), R = w.size(0) / groups;
    TORCH_CHECK_VALUE(x.dim() >= (groups > 1 ? 2 : 1) && x.size(-1) == K && (groups == 1 || x.size(-2) == groups),
                      "v4c_native.linear: x must be [..., ", groups > 1 ? "groups, " : "", K, "], got shape ",
                      x.sizes());
    const int64_t t = x.numel() / (groups * K);
    TORCH_CHECK_VALUE(t >= 1, "v4c_native.linear: x holds no rows (shape ", x.sizes(), ")");
    for (int64_t v : {t, groups}) check_fits_int(v, op, "size");
    const int isa = pick_isa(isa_arg, x.scalar_type(), op);
    auto shape = x.sizes().vec();
    shape.back() = groups > 1 ? R : w.size(0);
    Tensor out = at::empty(shape, x.options());
    const int64_t work = v4c_linear_work(int(t), int(groups), K, groups * R);
    const int rc = v4c_linear(threads(), isa, dt, int(t), int(groups), R, K, x.data_ptr(), w.data_ptr(),
                              out.data_ptr(), scratch(work / int64_t(sizeof(float)) + 16));
    TORCH_CHECK(rc != -3, "v4c_native.linear: this CPU (or compiler) has no kernel for these weights");
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.linear: bad sizes");
    return out;
}

// the router's steps after its product (route.c): scores [..., E] fp32; bias [E] fp32 (top-k) or
// table [V, k] int32 / int64 with ids [...] (hashed); returns idx, wts [..., k], perm [..., k], offsets [E + 1]
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_route(const Tensor &scores, const OptTensor &bias,
                                                     const OptTensor &table, const OptTensor &ids, int64_t k,
                                                     double scaling) {
    const char *op = "moe_route";
    check_plain(scores, op, "scores");
    check_dtype(scores, at::kFloat, op, "scores");
    TORCH_CHECK_VALUE(scores.dim() >= 1 && scores.size(-1) >= 1, "v4c_native.moe_route: scores must be [..., E], got "
                      "shape ", scores.sizes());
    const int64_t E = scores.size(-1), t = scores.numel() / E;
    check_fits_int(E, op, "experts E");
    TORCH_CHECK_VALUE(bias.has_value() != table.has_value(), "v4c_native.moe_route: give either bias or table");
    TORCH_CHECK_VALUE(table.has_value() == ids.has_value(), "v4c_native.moe_route: table and ids go together");
    int64_t V = 0;
    if (bias) {
        check_plain(*bias, op, "bias");
        check_dtype(*bias, at::kFloat, op, "bias");
        check_numel(*bias, E, op, "bias", "[E]");
        TORCH_CHECK_VALUE(k >= 1 && k <= E, "v4c_native.moe_route: k must lie in 1..", E, ", got ", k);
    } else {
        check_plain(*table, op, "table");
        check_plain(*ids, op, "ids");
        TORCH_CHECK_TYPE(table->scalar_type() == at::kInt || table->scalar_type() == at::kLong,
                         "v4c_native.moe_route: table must be int32 or int64, got ", table->scalar_type());
        check_dtype(*ids, at::kLong, op, "ids");
        TORCH_CHECK_VALUE(table->dim() == 2 && table->size(1) == k, "v4c_native.moe_route: table must be [V, k = ", k,
                          "], got shape ", table->sizes());
        check_numel(*ids, t, op, "ids", "one per token");
        V = table->size(0);
    }
    auto lead = scores.sizes().vec();
    lead.back() = k;
    Tensor idx = at::empty(lead, scores.options().dtype(at::kLong)), wts = at::empty(lead, scores.options());
    Tensor perm = at::empty(lead, scores.options().dtype(at::kLong));
    Tensor offsets = at::empty({E + 1}, scores.options().dtype(at::kLong));
    long bad = 0;
    const int rc = v4c_moe_route(t, int(E), int(k), scores.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
                                 table ? table->data_ptr() : nullptr, table && table->scalar_type() == at::kLong, V,
                                 ids ? ids->data_ptr<int64_t>() : nullptr, float(scaling), idx.data_ptr<int64_t>(),
                                 wts.data_ptr<float>(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), &bad);
    TORCH_CHECK_INDEX(rc != -1, "v4c_native.moe_route: token ", bad, "'s id ", ids ? ids->reshape(-1)[bad].item<int64_t>() : 0,
                      " is outside the hash table's ", V, " rows");
    TORCH_CHECK_INDEX(rc != -2, "v4c_native.moe_route: hash table entry [", bad / k, ", ", bad % k,
                      "] names no expert of 0..", E - 1);
    return {idx, wts, perm, offsets};
}

// the router's scoring in place (route.c): x = sqrt(softplus(x)), element by element, fp32
Tensor &sqrt_softplus_(Tensor &x) {
    const char *op = "sqrt_softplus_";
    check_plain(x, op, "x");
    check_dtype(x, at::kFloat, op, "x");
    v4c_sqrt_softplus(x.data_ptr<float>(), long(x.numel()));
    return x;
}

// a decode call's output projection in one operator: the grouped low-rank product (x [..., G, K] against w_a's
// G groups of R rows), its result viewed as [lead dims of z..., *tail] (the op's out_shape), then the dense product
Tensor o_proj_step(const Tensor &x, const Tensor &wa, int64_t groups, const Tensor &wb, int64_t lead,
                   at::IntArrayRef tail) {
    TORCH_CHECK_VALUE(lead >= 0 && lead < x.dim(), "v4c_native.o_proj_step: lead ", lead, " is outside 0..",
                      x.dim() - 1);
    Tensor xg = x;
    if (!(x.dim() >= 2 && x.size(-2) == groups)) { // x [lead dims, ...] as [lead dims, groups, K]
        std::vector<int64_t> s(x.sizes().begin(), x.sizes().begin() + lead);
        int64_t rest = 1;
        for (int64_t i = lead; i < x.dim(); i++) rest *= x.size(i);
        TORCH_CHECK_VALUE(rest % groups == 0, "v4c_native.o_proj_step: x's ", rest, " values a row are not ", groups,
                          " groups, got shape ", x.sizes());
        s.insert(s.end(), {groups, rest / groups});
        xg = x.reshape(s);
    }
    Tensor z = linear(xg, wa, groups, std::nullopt);
    TORCH_CHECK_VALUE(lead <= z.dim(), "v4c_native.o_proj_step: lead ", lead, " is outside 0..", z.dim());
    std::vector<int64_t> s(z.sizes().begin(), z.sizes().begin() + lead);
    s.insert(s.end(), tail.begin(), tail.end());
    return linear(z.reshape(s), wb, 1, std::nullopt);
}

// a decode call's whole router in one operator: the product (linear.c, in x's dtype), its widening, the
// scores (route.c's sqrt(softplus)) and the selection, the same steps as the three operators one by one
// (each a trip through Python that costs more than its arithmetic once a step's weights have left the caches)
std::tuple<Tensor, Tensor, Tensor, Tensor> router_step(const Tensor &x, const Tensor &w, const OptTensor &bias,
                                                       const OptTensor &table, const OptTensor &ids, int64_t k,
                                                       double scaling) {
    Tensor scores = linear(x, w, 1, std::nullopt).to(at::kFloat).contiguous();
    sqrt_softplus_(scores);
    const OptTensor b32 = bias ? OptTensor(as_f32(*bias, "router_step", "bias").contiguous()) : std::nullopt;
    return moe_route(scores, b32, table, ids, k, scaling);
}

// ---- quantised weights (quant.c) --------------------------------------------------------------

// the C code's format codes (quant.c): plain weights 0 float32, 1 bfloat16, 4 float16; 2 FP8 e4m3 128x128, 3 MXFP4
constexpr int QF_FP8 = 2, QF_MXFP4 = 3, QF_F16 = 4;

int quant_code(c10::string_view fmt_arg, const char *op, const char *name) {
    const std::string fmt(fmt_arg.data(), fmt_arg.size());
    if (fmt == "f8e4m3") return QF_FP8;
    if (fmt == "mxfp4") return QF_MXFP4;
    TORCH_CHECK_VALUE(false, "v4c_native.", op, ": ", name, " format must be 'f8e4m3' or 'mxfp4', got '", fmt, "'");
    return -1;
}

// a quantised weight of logical shape [lead..., N, K] as stored (weight_formats.py): FP8 data
// float8_e4m3fn [..., N, K], scale [..., ceil(N/128), ceil(K/128)]; MXFP4 data int8 [..., N, K/2], scale
// [..., N, K/32]; scales float8_e8m0fnu (or their uint8 bytes); both contiguous on the CPU
void check_quant(const Tensor &data, const Tensor &scale, int fmt, std::vector<int64_t> lead, int64_t N, int64_t K,
                 const char *op, const char *name) {
    check_plain(data, op, name);
    check_plain(scale, op, name);
    const auto st = data.scalar_type(), ss = scale.scalar_type();
    if (fmt == QF_FP8) {
        TORCH_CHECK_TYPE(st == at::kFloat8_e4m3fn, "v4c_native.", op, ": ", name, " (f8e4m3) data must be ",
                         "Float8_e4m3fn, got ", st);
    } else {
        TORCH_CHECK_TYPE(st == at::kChar || st == at::kByte, "v4c_native.", op, ": ", name,
                         " (mxfp4) data must be int8, got ", st);
        TORCH_CHECK_VALUE(K % 32 == 0, "v4c_native.", op, ": ", name, " (mxfp4) input width ", K,
                          " is not a multiple of 32");
    }
    TORCH_CHECK_TYPE(ss == at::kFloat8_e8m0fnu || ss == at::kByte, "v4c_native.", op, ": ", name,
                     " scale must be Float8_e8m0fnu (or uint8), got ", ss);
    auto dshape = lead, sshape = lead;
    dshape.push_back(N);
    dshape.push_back(fmt == QF_FP8 ? K : K / 2);
    sshape.push_back(fmt == QF_FP8 ? (N + 127) / 128 : N);
    sshape.push_back(fmt == QF_FP8 ? (K + 127) / 128 : K / 32);
    TORCH_CHECK_VALUE(data.sizes().vec() == dshape, "v4c_native.", op, ": ", name, " data must have shape ",
                      c10::IntArrayRef(dshape), ", got ", data.sizes());
    TORCH_CHECK_VALUE(scale.sizes().vec() == sshape, "v4c_native.", op, ": ", name, " scale must have shape ",
                      c10::IntArrayRef(sshape), ", got ", scale.sizes());
}

const uint8_t *bytes(const Tensor &t) { return static_cast<const uint8_t *>(t.data_ptr()); }

bool quant_supported() { return v4c_quant_supported() != 0; }

// the quantised products' instruction sets this CPU runs, the default (the best) first: avx512bf16 (quant_bf16.c),
// avx2
constexpr int QUANT_ISAS[] = {3, 1};

std::vector<std::string> quant_isas() {
    std::vector<std::string> out;
    for (int isa : QUANT_ISAS)
        if (v4c_quant_isa_supported(isa)) out.push_back(ISA_NAMES[isa]);
    return out;
}

// the code of the instruction set named by isa_arg (0 when none is named: the best), checked against quant_isas
int pick_quant_isa(const std::optional<c10::string_view> &isa_arg, const char *op) {
    if (!isa_arg.has_value()) return 0;
    const std::string want(isa_arg->data(), isa_arg->size());
    int isa = -1;
    for (int i : QUANT_ISAS)
        if (want == ISA_NAMES[i]) isa = i;
    TORCH_CHECK_VALUE(isa > 0, "v4c_native.", op, ": unknown instruction set '", want,
                      "' for the quantised products (avx2, avx512bf16)");
    TORCH_CHECK(v4c_quant_isa_supported(isa), "v4c_native.", op, ": this CPU (or compiler) has no ", want,
                " kernel for the quantised products");
    return isa;
}

Tensor qlinear(const Tensor &x, const Tensor &data, const Tensor &scale, c10::string_view fmt_arg, int64_t groups,
               std::optional<c10::string_view> isa_arg) {
    const char *op = "qlinear";
    const int dt = float_code(x, op, "x");
    check_plain(x, op, "x");
    const int fmt = quant_code(fmt_arg, op, "w");
    TORCH_CHECK_VALUE(data.dim() == 2, "v4c_native.qlinear: w must be 2-D, got data of shape ", data.sizes());
    const int64_t N = data.size(0);
    TORCH_CHECK_VALUE(groups >= 1 && N >= groups && N % groups == 0, "v4c_native.qlinear: ", N,
                      " output rows do not split into groups = ", groups);
    const int64_t K = fmt == QF_FP8 ? data.size(1) : 2 * data.size(1), R = N / groups;
    check_quant(data, scale, fmt, {}, N, K, op, "w");
    TORCH_CHECK_VALUE(K >= 1 && x.dim() >= (groups > 1 ? 2 : 1) && x.size(-1) == K &&
                          (groups == 1 || x.size(-2) == groups),
                      "v4c_native.qlinear: x must be [..., ", groups > 1 ? "groups, " : "", K, "], got shape ",
                      x.sizes());
    const int64_t t = x.numel() / (groups * K);
    TORCH_CHECK_VALUE(t >= 1, "v4c_native.qlinear: x holds no rows (shape ", x.sizes(), ")");
    for (int64_t v : {t, groups}) check_fits_int(v, op, "size");
    TORCH_CHECK(quant_supported(), "v4c_native.qlinear: this CPU (or compiler) has no AVX2 + FMA");
    const int isa = pick_quant_isa(isa_arg, op);
    auto shape = x.sizes().vec();
    shape.back() = groups > 1 ? R : N;
    Tensor out = at::empty(shape, x.options());
    const int nt = threads();
    const int64_t work = v4c_qlinear_work(nt, int(t), int(groups), K, N);
    const int rc = v4c_qlinear(nt, isa, fmt, dt, int(t), int(groups), R, K, x.data_ptr(), data.data_ptr(), bytes(scale),
                               out.data_ptr(), scratch(work / int64_t(sizeof(float)) + 16));
    TORCH_CHECK(rc != -3, "v4c_native.qlinear: this CPU (or compiler) has no AVX2 + FMA");
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.qlinear: bad sizes");
    return out;
}

Tensor moe_decode_q(const Tensor &x, const Tensor &w, const Tensor &perm, const Tensor &offsets,
                    c10::string_view fmt_arg, const Tensor &w13, const Tensor &w13_scale, const Tensor &w2,
                    const Tensor &w2_scale, std::optional<c10::string_view> shared_fmt_arg,
                    const OptTensor &shared_gate, const OptTensor &shared_gate_scale, const OptTensor &shared_up,
                    const OptTensor &shared_up_scale, const OptTensor &shared_down,
                    const OptTensor &shared_down_scale, int64_t k, double limit,
                    std::optional<c10::string_view> isa_arg) {
    const char *op = "moe_decode_q";
    const int dt = float_code(x, op, "x");
    check_plain(x, op, "x");
    // (token rows in any leading shape: [t, D] or a call's [B, T, D]; the result has x's shape)
    TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(-1) >= 1, "v4c_native.moe_decode_q: x must be [..., D] token rows, got shape ",
                      x.sizes());
    const int64_t D = x.size(-1), t = x.numel() / D;
    TORCH_CHECK_VALUE(k >= 1, "v4c_native.moe_decode_q: k must be at least 1, got ", k);
    const int fmt = quant_code(fmt_arg, op, "the routed experts'");
    TORCH_CHECK_VALUE(w13.dim() == 3, "v4c_native.moe_decode_q: w13 must be [E, 2I, D], got data of shape ",
                      w13.sizes());
    TORCH_CHECK_VALUE(w2.dim() == 3, "v4c_native.moe_decode_q: w2 must be [E, D, I], got data of shape ", w2.sizes());
    const int64_t E = w13.size(0), I = fmt == QF_FP8 ? w2.size(2) : 2 * w2.size(2);
    TORCH_CHECK_VALUE(t >= 1 && D >= 1 && I >= 1 && E >= 1, "v4c_native.moe_decode_q: empty operand (t ", t, ", D ",
                      D, ", I ", I, ", E ", E, ")");
    check_quant(w13, w13_scale, fmt, {E}, 2 * I, D, op, "w13");
    check_quant(w2, w2_scale, fmt, {E}, D, I, op, "w2");
    for (int64_t v : {t, D, I, E, k}) check_fits_int(v, op, "size");
    Tensor w32 = check_routing(perm, offsets, w, t, k, E, op);
    const bool shared = shared_gate.has_value();
    TORCH_CHECK_VALUE(shared == shared_up.has_value() && shared == shared_down.has_value(), "v4c_native.", op,
                      ": the shared expert needs all of gate, up and down, or none");
    int sfmt = dt == 2 ? QF_F16 : dt; // a plain shared expert: the activations' dtype (its plain format's code)
    int64_t Is = 0;
    if (shared) {
        Is = shared_gate->dim() >= 1 ? shared_gate->size(0) : 0;
        TORCH_CHECK_VALUE(Is >= 1, "v4c_native.moe_decode_q: the shared expert's width must be at least 1, got ", Is);
        check_fits_int(Is, op, "shared width");
        const OptTensor *parts[3][2] = {{&shared_gate, &shared_gate_scale}, {&shared_up, &shared_up_scale},
                                        {&shared_down, &shared_down_scale}};
        const char *names[3] = {"shared_gate", "shared_up", "shared_down"};
        const int64_t Ns[3] = {Is, Is, D}, Ks[3] = {D, D, Is};
        if (shared_fmt_arg.has_value()) {
            sfmt = quant_code(*shared_fmt_arg, op, "the shared expert's");
            for (int i = 0; i < 3; i++) {
                TORCH_CHECK_VALUE(parts[i][1]->has_value(), "v4c_native.moe_decode_q: ", names[i],
                                  " is quantised but has no scale");
                check_quant(**parts[i][0], **parts[i][1], sfmt, {}, Ns[i], Ks[i], op, names[i]);
            }
        } else {
            for (int i = 0; i < 3; i++) {
                check_dtype(**parts[i][0], x.scalar_type(), op, names[i]);
                check_plain(**parts[i][0], op, names[i]);
                TORCH_CHECK_VALUE(parts[i][0]->value().dim() == 2 && parts[i][0]->value().size(0) == Ns[i] &&
                                      parts[i][0]->value().size(1) == Ks[i],
                                  "v4c_native.moe_decode_q: ", names[i], " must be [", Ns[i], ", ", Ks[i],
                                  "], got shape ", parts[i][0]->value().sizes());
            }
        }
    }
    check_indices(perm, offsets, t, k, E, op);
    TORCH_CHECK(quant_supported(), "v4c_native.moe_decode_q: this CPU (or compiler) has no AVX2 + FMA");
    const int isa = pick_quant_isa(isa_arg, op);
    Tensor out = at::empty_like(x);
    const int nt = threads();
    const int64_t work = v4c_moe_decode_q_work(nt, int(t), int(D), int(I), int(shared ? Is : 0), int(k), int(E));
    auto sp = [](const OptTensor &s) { return s.has_value() ? bytes(*s) : nullptr; };
    const int rc = v4c_moe_decode_q(
        nt, isa, dt, int(t), int(D), int(I), int(shared ? Is : 0), int(k), int(E), x.data_ptr(),
        offsets.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), w32.data_ptr<float>(), fmt, w13.data_ptr(),
        bytes(w13_scale), w2.data_ptr(), bytes(w2_scale), sfmt,
        ptr(shared_gate), shared_fmt_arg ? sp(shared_gate_scale) : nullptr, ptr(shared_up),
        shared_fmt_arg ? sp(shared_up_scale) : nullptr, ptr(shared_down),
        shared_fmt_arg ? sp(shared_down_scale) : nullptr, float(limit), out.data_ptr(),
        scratch(work / int64_t(sizeof(float)) + 16));
    TORCH_CHECK(rc != -3, "v4c_native.moe_decode_q: this CPU (or compiler) has no AVX2 + FMA");
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.moe_decode_q: bad sizes or formats");
    return out;
}

} // namespace

// the plain product for the operators of ops.cpp that hold one (x [..., K] and w [N, K] of one float dtype)
Tensor v4c_native_ops::dense_linear(const Tensor &x, const Tensor &w) { return linear(x, w, 1, std::nullopt); }

TORCH_LIBRARY_FRAGMENT(v4c_native, m) {
    m.def("moe_decode(Tensor x, Tensor w, Tensor perm, Tensor offsets, Tensor w13, Tensor w2, Tensor? shared_gate, "
          "Tensor? shared_up, Tensor? shared_down, int k, float limit, str? isa=None) -> Tensor");
    m.def("dot_isas(ScalarType dtype) -> str[]", &dot_isas);
    m.def("linear(Tensor x, Tensor w, int groups=1, str? isa=None) -> Tensor");
    m.def("moe_route(Tensor scores, Tensor? bias, Tensor? table, Tensor? ids, int k, float scaling) -> "
          "(Tensor, Tensor, Tensor, Tensor)");
    m.def("sqrt_softplus_(Tensor(a!) x) -> Tensor(a!)");
    m.def("o_proj_step(Tensor x, Tensor wa, int groups, Tensor wb, int lead, int[] tail) -> Tensor");
    m.def("router_step(Tensor x, Tensor w, Tensor? bias, Tensor? table, Tensor? ids, int k, float scaling) -> "
          "(Tensor, Tensor, Tensor, Tensor)");
    m.def("quant_supported() -> bool", &quant_supported);
    m.def("quant_isas() -> str[]", &quant_isas);
    m.def("qlinear(Tensor x, Tensor data, Tensor scale, str fmt, int groups=1, str? isa=None) -> Tensor");
    m.def("moe_decode_q(Tensor x, Tensor w, Tensor perm, Tensor offsets, str fmt, Tensor w13, Tensor w13_scale, "
          "Tensor w2, Tensor w2_scale, str? shared_fmt, Tensor? shared_gate, Tensor? shared_gate_scale, "
          "Tensor? shared_up, Tensor? shared_up_scale, Tensor? shared_down, Tensor? shared_down_scale, "
          "int k, float limit, str? isa=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(v4c_native, CPU, m) {
    m.impl("moe_decode", &moe_decode);
    m.impl("linear", &linear);
    m.impl("qlinear", &qlinear);
    m.impl("moe_decode_q", &moe_decode_q);
    m.impl("moe_route", &moe_route);
    m.impl("sqrt_softplus_", &sqrt_softplus_);
    m.impl("router_step", &router_step);
    m.impl("o_proj_step", &o_proj_step);
}
