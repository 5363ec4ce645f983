// The C helpers as PyTorch operators: the schemas of the `v4c_native` namespace (TORCH_LIBRARY) and
// their CPU kernels (TORCH_LIBRARY_IMPL), which check every operand's dtype, shape, device and
// layout (an error with the operand's name, never a crash), allocate the outputs and hand raw
// pointers to the C code (mhc.c, norm_rope.c, attention.c, moe.c, linear.c, dots.c, quant.c, route.c,
// compress.c, indexer.c, compiled as C and linked in).
//
// Threads: row ranges still run on PyTorch's own OpenMP team through parallel.c; the team's entry
// points are looked up once, when this library is loaded (see `find_openmp`), and each call asks
// for at::get_num_threads() threads, as torch.get_num_threads() reports them.
// Scratch memory the C code does not allocate itself is one buffer per calling thread, kept
// across calls (a fresh multi-MB buffer would cost its page faults again on every call); the
// operators drop the GIL, so two Python threads may call at once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/view_as_real.h>
#include <torch/library.h>

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
int v4c_hc_mix(int threads, long rows, int n, int D, int mode, int xdt, int wdt, const void *x, const void *y,
               const float *post_in, const float *comb_in, const float *fn, const float *base, const float *scale,
               const void *norm_w, float eps, float hc_eps, int iters, void *x1_out, void *h_out, float *post_out,
               float *comb_out, float *work);
long v4c_hc_work(int n, int D);
int v4c_norm_rope(int threads, int norm, long rows, int heads, int d, int xdt, void *x, const void *w, int wdt,
                  float eps, int rope_dim, const float *rot, float *work);
int v4c_ring_append(long B, long T, long W, long D, int size, const void *kv, void *ring, int64_t *ring_pos,
                    const int64_t *pos);
int v4c_attention(int threads, int B, int T, int H, int D, int dt, int kind, int window, int ratio, const void *q,
                  const void *kv, const void *ring, const int64_t *ring_pos, int W, const float *sinks,
                  const int64_t *pos, const void *rows, int N, const int64_t *idx, int K, float scale, int pairs, void *out);
int v4c_isa_supported(int isa);
int v4c_best_isa(int wdt);
long v4c_moe_decode_work(int t, int D, int I, int Is, int k, int E);
int v4c_moe_decode(int threads, int isa, int dt, int t, int D, int I, int Is, int k, int E, const void *x,
                   const int64_t *offsets, const int64_t *perm, const float *w, const void *w13, const void *w2,
                   const void *sg, const void *su, const void *sd, float limit, void *out, void *work);
long v4c_linear_work(int t, int G, long K, long N);
int v4c_linear(int threads, int isa, int dt, int t, int G, long R, long K, const void *x, const void *W, void *out,
               void *work);
int v4c_use_openmp(void *parallel, void *thread_num, void *num_threads);
int v4c_compress_step(long B, int C, int ratio, int overlap, int dt, const void *kv, const void *gate,
                      const float *ape, float *pend_kv, float *pend_gate, const int64_t *pos, float *pooled);
long v4c_indexer_work(int threads, int H, int D, long n);
int v4c_indexer_topk(int threads, long B, long T, int H, int D, int qdt, const void *q, const void *w, int kdt,
                     const void *keys, long N, const int64_t *pos, int ratio, float scale, int topk, int64_t *out,
                     int pairs, void *work);
void v4c_sqrt_softplus(float *x, long n);
int v4c_moe_route(long t, int E, int k, const float *scores, const float *bias, const void *table, int table_i64,
                  long V, const int64_t *ids, float scaling, int64_t *idx, float *wts, int64_t *perm,
                  int64_t *offsets, long *bad);
int v4c_quant_supported(void);
long v4c_qlinear_work(int threads, int t, int G, long K, long N);
int v4c_qlinear(int threads, int fmt, int dt, int t, int G, long R, long K, const void *x, const void *W,
                const uint8_t *S, void *out, void *work);
long v4c_moe_decode_q_work(int threads, int t, int D, int I, int Is, int k, int E);
int v4c_moe_decode_q(int threads, int dt, int t, int D, int I, int Is, int k, int E, const void *x,
                     const int64_t *offsets, const int64_t *perm, const float *w, int fmt, const void *w13,
                     const uint8_t *w13s, const void *w2, const uint8_t *w2s, int sfmt, const void *sg,
                     const uint8_t *sgs, const void *su, const uint8_t *sus, const void *sd, const uint8_t *sds,
                     float limit, void *out, void *work);
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- PyTorch's OpenMP team --------------------------------------------------------------------

struct OmpEntries {
    void *parallel = nullptr, *thread_num = nullptr, *num_threads = nullptr;
    bool complete() const { return parallel && thread_num && num_threads; }
};

OmpEntries entries_in(void *handle) {
    return {dlsym(handle, "GOMP_parallel"), dlsym(handle, "omp_get_thread_num"), dlsym(handle, "omp_get_num_threads")};
}

int search_loaded(struct dl_phdr_info *info, size_t, void *data) {
    auto *found = static_cast<OmpEntries *>(data);
    const char *name = info->dlpi_name;
    if (!name || !*name || !std::strstr(name, "omp")) return 0;
    void *handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD); // only a library that is already loaded
    if (!handle) return 0;
    OmpEntries e = entries_in(handle);
    dlclose(handle);
    if (!e.complete()) return 0;
    *found = e;
    return 1;
}

// GOMP_parallel, omp_get_thread_num and omp_get_num_threads of the OpenMP runtime PyTorch already
// loaded: from the global scope when it is there, else from the loaded library that holds them
// (the wheels' libgomp can be local to libtorch_cpu). Not found: the helpers run single-threaded.
OmpEntries find_openmp() {
    OmpEntries e = entries_in(RTLD_DEFAULT);
    if (!e.complete()) {
        e = OmpEntries{};
        dl_iterate_phdr(search_loaded, &e);
    }
    if (v4c_use_openmp(e.parallel, e.thread_num, e.num_threads) != 0) e = OmpEntries{};
    return e;
}

const OmpEntries openmp = find_openmp();

// ---- checks -----------------------------------------------------------------------------------

// dtype code of the C helpers: 0 float32, 1 bfloat16
int float_code(const Tensor &t, const char *op, const char *name) {
    const auto st = t.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16, "v4c_native.", op, ": ", name,
                     " must be float32 or bfloat16, got ", st);
    return st == at::kBFloat16 ? 1 : 0;
}

void check_plain(const Tensor &t, const char *op, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "v4c_native.", op, ": ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), "v4c_native.", op, ": ", name, " must be contiguous");
}

void check_dtype(const Tensor &t, at::ScalarType want, const char *op, const char *name) {
    TORCH_CHECK_TYPE(t.scalar_type() == want, "v4c_native.", op, ": ", name, " must be ", want, ", got ",
                     t.scalar_type());
}

void check_numel(const Tensor &t, int64_t want, const char *op, const char *name, const char *shape) {
    TORCH_CHECK_VALUE(t.numel() == want, "v4c_native.", op, ": ", name, " must hold ", shape, " = ", want,
                      " elements, got shape ", t.sizes());
}

void check_fits_int(int64_t v, const char *op, const char *what) {
    TORCH_CHECK_VALUE(v >= 0 && v <= INT32_MAX, "v4c_native.", op, ": ", what, " ", v, " is out of range");
}

// an fp32 contiguous CPU copy of a float operand (the operand itself when it already is one)
Tensor as_f32(const Tensor &t, const char *op, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "v4c_native.", op, ": ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "v4c_native.", op, ": ", name,
                     " must be a floating-point tensor, got ", t.scalar_type());
    if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t; // (no dispatch at all: decode calls are short)
    return t.to(at::kFloat).contiguous();
}

const void *ptr(const OptTensor &t) { return t.has_value() ? t->data_ptr() : nullptr; }

// this thread's scratch of at least n floats, kept across calls
float *scratch(int64_t n) {
    thread_local std::unique_ptr<float[]> buf;
    thread_local int64_t held = 0;
    if (held < n) {
        buf.reset(new float[n]);
        held = n;
    }
    return buf.get();
}

int threads() { return std::max(1, at::get_num_threads()); }

// ---- kernels ----------------------------------------------------------------------------------

std::tuple<OptTensor, Tensor, OptTensor, OptTensor> hc_mix(const Tensor &x, const OptTensor &y, const OptTensor &post,
                                                           const OptTensor &comb, const Tensor &fn, const Tensor &base,
                                                           const Tensor &scale, const OptTensor &norm_w, double eps,
                                                           double hc_eps, int64_t iters, bool head) {
    const char *op = "hc_mix";
    TORCH_CHECK_VALUE(x.dim() == 4, "v4c_native.hc_mix: x must be [B, T, n, D], got shape ", x.sizes());
    const int xdt = float_code(x, op, "x");
    check_plain(x, op, "x");
    const int64_t B = x.size(0), T = x.size(1), n = x.size(2), D = x.size(3), rows = B * T;
    TORCH_CHECK_VALUE(n >= 1 && n <= 8, "v4c_native.hc_mix: ", n, " streams is more than the C helpers support (1..8)");
    check_fits_int(D, op, "width D");
    const bool mix = y.has_value();
    const int64_t M = head ? n : (n + 2) * n;
    Tensor fn32 = as_f32(fn, op, "fn"), base32 = as_f32(base, op, "base"), scale32 = as_f32(scale, op, "scale");
    check_numel(fn32, M * n * D, op, "fn", head ? "[n, n*D]" : "[(n+2)*n, n*D]");
    check_numel(base32, M, op, "base", head ? "[n]" : "[(n+2)*n]");
    TORCH_CHECK_VALUE(scale32.numel() >= (head ? 1 : 3), "v4c_native.hc_mix: scale must hold ", head ? 1 : 3,
                      " values, got shape ", scale32.sizes());
    Tensor post32, comb32;
    if (mix) {
        TORCH_CHECK_TYPE(y->scalar_type() == x.scalar_type(), "v4c_native.hc_mix: y must have x's dtype ",
                         x.scalar_type(), ", got ", y->scalar_type());
        check_plain(*y, op, "y");
        check_numel(*y, rows * D, op, "y", "[B, T, D]");
        TORCH_CHECK_VALUE(post.has_value() && comb.has_value(),
                          "v4c_native.hc_mix: the post-mix (y given) needs post and comb");
        post32 = as_f32(*post, op, "post");
        comb32 = as_f32(*comb, op, "comb");
        check_numel(post32, rows * n, op, "post", "[B, T, n]");
        check_numel(comb32, rows * n * n, op, "comb", "[B, T, n, n]");
    }
    OptTensor w;
    int wdt = 0;
    if (norm_w.has_value()) {
        w = norm_w->scalar_type() == at::kBFloat16 ? norm_w->contiguous() : as_f32(*norm_w, op, "norm_w");
        check_plain(*w, op, "norm_w");
        check_numel(*w, D, op, "norm_w", "[D]");
        wdt = float_code(*w, op, "norm_w");
    }
    OptTensor x1, post_out, comb_out;
    if (mix) x1 = at::empty_like(x);
    Tensor h = at::empty({B, T, D}, x.options());
    if (!head) {
        post_out = at::empty({B, T, n}, x.options().dtype(at::kFloat));
        comb_out = at::empty({B, T, n, n}, x.options().dtype(at::kFloat));
    }
    const int nt = threads();
    float *work = scratch(int64_t(nt) * v4c_hc_work(int(n), int(D)));
    const int rc = v4c_hc_mix(nt, rows, int(n), int(D), (mix ? 1 : 0) | (head ? 2 : 0), xdt, wdt, x.data_ptr(),
                              mix ? y->data_ptr() : nullptr, mix ? post32.data_ptr<float>() : nullptr,
                              mix ? comb32.data_ptr<float>() : nullptr, fn32.data_ptr<float>(),
                              base32.data_ptr<float>(), scale32.data_ptr<float>(), ptr(w), float(eps), float(hc_eps),
                              int(iters), x1.has_value() ? x1->data_ptr() : nullptr, h.data_ptr(),
                              post_out.has_value() ? post_out->data_ptr<float>() : nullptr,
                              comb_out.has_value() ? comb_out->data_ptr<float>() : nullptr, work);
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.hc_mix: ", n, " streams is more than the C helpers support (1..8)");
    return {x1, h, post_out, comb_out};
}

Tensor norm_rope_(Tensor &x, const OptTensor &w, double eps, int64_t rope_dim, const OptTensor &rot, bool norm) {
    const char *op = "norm_rope_";
    TORCH_CHECK_VALUE(norm || rot.has_value(), "v4c_native.norm_rope_: without the norm, rot is needed");
    TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4,
                      "v4c_native.norm_rope_: x must be [B, T, d] or [B, T, H, d], got shape ", x.sizes());
    const int xdt = float_code(x, op, "x");
    check_plain(x, op, "x");
    const int64_t rows = x.size(0) * x.size(1), heads = x.dim() == 4 ? x.size(2) : 1, d = x.size(-1);
    check_fits_int(d, op, "width d");
    check_fits_int(heads, op, "heads");
    TORCH_CHECK_VALUE(rope_dim % 2 == 0 && rope_dim >= 0 && rope_dim <= d, "v4c_native.norm_rope_: rope_dim ", rope_dim,
                      " must be even and at most ", d);
    int wdt = 0;
    if (w.has_value()) {
        wdt = float_code(*w, op, "w");
        check_plain(*w, op, "w");
        check_numel(*w, d, op, "w", "[d]");
    }
    Tensor rr;
    if (rot.has_value()) {
        TORCH_CHECK(rot->device().is_cpu(), "v4c_native.norm_rope_: rot must be on the CPU, got ", rot->device());
        rr = *rot;
        if (rr.is_complex()) rr = at::view_as_real(rr.resolve_conj().to(at::kComplexFloat));
        check_dtype(rr, at::kFloat, op, "rot (as real (cos, sin) pairs)");
        rr = rr.contiguous();
        check_numel(rr, rows * rope_dim, op, "rot", "[B, T, rope_dim/2] complex");
    }
    const int nt = threads();
    const float *rotp = rr.defined() ? rr.data_ptr<float>() : nullptr;
    const int rc = v4c_norm_rope(nt, norm ? 1 : 0, rows, int(heads), int(d), xdt, x.data_ptr(), norm ? ptr(w) : nullptr,
                                 wdt, float(eps), int(rope_dim), rotp, scratch(int64_t(nt) * d));
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.norm_rope_: rope_dim ", rope_dim, " must be even and at most ", d);
    return x;
}

int pick_isa(const std::optional<c10::string_view> &isa_arg, at::ScalarType dtype, const char *op); // below

Tensor attention(const Tensor &q, const Tensor &kv, const Tensor &ring, const Tensor &ring_pos, const Tensor &sinks,
                 const Tensor &pos, const OptTensor &rows, const OptTensor &idx, c10::string_view kind_arg,
                 int64_t window, int64_t ratio, double scale, std::optional<c10::string_view> isa_arg) {
    const char *op = "attention";
    const std::string kind(kind_arg.data(), kind_arg.size());
    int k = -1;
    if (kind == "sliding") k = 0;
    else if (kind == "hca") k = 1;
    else if (kind == "csa") k = 2;
    TORCH_CHECK_VALUE(k >= 0, "v4c_native.attention: kind must be 'sliding', 'hca' or 'csa', got '", kind, "'");
    TORCH_CHECK_VALUE(k != 1 || ratio >= 1, "attention: kind '", kind, "' with ratio ", ratio,
                      " is not one the C helpers take");
    TORCH_CHECK_VALUE(q.dim() == 4, "v4c_native.attention: q must be [B, T, H, D], got shape ", q.sizes());
    const int dt = float_code(q, op, "q");
    const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
    for (int64_t v : {B, T, H, D}) check_fits_int(v, op, "size");
    check_plain(q, op, "q");
    auto same_dtype = [&](const Tensor &t, const char *name) {
        TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "v4c_native.attention: ", name, " must have q's dtype ",
                         q.scalar_type(), ", got ", t.scalar_type());
        check_plain(t, op, name);
    };
    auto int64s = [&](const Tensor &t, const char *name) {
        check_dtype(t, at::kLong, op, name);
        check_plain(t, op, name);
    };
    same_dtype(kv, "kv");
    check_numel(kv, B * T * D, op, "kv", "[B, T, D]");
    same_dtype(ring, "ring");
    TORCH_CHECK_VALUE(ring.dim() == 3 && ring.size(0) == B && ring.size(2) == D,
                      "v4c_native.attention: ring must be [B, W, D] = [", B, ", W, ", D, "], got shape ", ring.sizes());
    const int64_t W = ring.size(1);
    check_fits_int(W, op, "ring rows W");
    int64s(ring_pos, "ring_pos");
    check_numel(ring_pos, B * W, op, "ring_pos", "[B, W]");
    int64s(pos, "pos");
    check_numel(pos, B * T, op, "pos", "[B, T]");
    Tensor s = as_f32(sinks, op, "sinks");
    check_numel(s, H, op, "sinks", "[H]");
    int64_t N = 0, K = 0;
    if (k != 0) {
        TORCH_CHECK_VALUE(rows.has_value(), "v4c_native.attention: kind '", kind, "' needs the compressed rows");
        same_dtype(*rows, "rows");
        TORCH_CHECK_VALUE(rows->dim() == 3 && rows->size(0) == B && rows->size(2) == D,
                          "v4c_native.attention: rows must be [B, N, D] = [", B, ", N, ", D, "], got shape ",
                          rows->sizes());
        N = rows->size(1);
        check_fits_int(N, op, "compressed rows N");
    }
    if (k == 2) {
        TORCH_CHECK_VALUE(idx.has_value(), "v4c_native.attention: kind 'csa' needs idx");
        int64s(*idx, "idx");
        TORCH_CHECK_VALUE(idx->dim() == 3 && idx->size(0) == B && idx->size(1) == T,
                          "v4c_native.attention: idx must be [B, T, K] = [", B, ", ", T, ", K], got shape ",
                          idx->sizes());
        K = idx->size(2);
        check_fits_int(K, op, "picks K");
    }
    check_fits_int(window, op, "window");
    // bf16 pairs (attention_bf16.c) where the products' kernels would take them; another named set: fp32 products
    const int named = isa_arg.has_value() ? pick_isa(isa_arg, q.scalar_type(), op) : -1;
    const int pairs = dt == 1 && (named > 0 ? named : v4c_best_isa(1)) == 3;
    Tensor out = at::empty_like(q);
    const int rc = v4c_attention(threads(), int(B), int(T), int(H), int(D), dt, k, int(window), int(ratio),
                                 q.data_ptr(), kv.data_ptr(), ring.data_ptr(), ring_pos.data_ptr<int64_t>(), int(W),
                                 s.data_ptr<float>(), pos.data_ptr<int64_t>(), N ? rows->data_ptr() : nullptr, int(N),
                                 K ? idx->data_ptr<int64_t>() : nullptr, int(K), float(scale), pairs, out.data_ptr());
    TORCH_CHECK_VALUE(rc != -1, "attention: kind '", kind, "' with ratio ", ratio, " is not one the C helpers take");
    TORCH_CHECK_WITH(OutOfMemoryError, rc == 0, "v4c_native.attention: could not allocate scratch memory");
    return out;
}

// the dot-product kernels' instruction sets (dots.h), by name, and the order dot_isas lists them in
const char *const ISA_NAMES[] = {"", "avx2", "avx512f", "avx512bf16", "avx512vl"};
constexpr int N_ISAS = 5;
constexpr int ISA_ORDER[] = {3, 2, 4, 1}; // avx512bf16, avx512f, avx512vl, avx2

// the instruction sets this CPU runs the dot-product kernels with for weights of `dtype`, best first
std::vector<std::string> dot_isas(at::ScalarType dtype) {
    std::vector<std::string> out;
    if (dtype != at::kFloat && dtype != at::kBFloat16) return out;
    const int dt = dtype == at::kBFloat16;
    const int best = v4c_best_isa(dt); // (the kernels' own pick, first: not always the widest, see dots.c)
    if (best > 0) out.push_back(ISA_NAMES[best]);
    for (int isa : ISA_ORDER)
        if (isa != best && v4c_isa_supported(isa) && (dt || isa != 3)) out.push_back(ISA_NAMES[isa]);
    return out;
}

// the instruction set a caller named (-1: the best there is), checked against this CPU
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
    TORCH_CHECK_VALUE(x.dim() == 2, "v4c_native.moe_decode: x must be [t, D], got shape ", x.sizes());
    const int64_t t = x.size(0), D = x.size(1);
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

// the compressor's decode step after its products (compress.c): kv, gate [B, 1, C] (fp32 / bf16), ape
// [ratio, C] fp32, pend_kv / pend_gate [B, slots, C] fp32 (updated in place), pos [B, 1]; returns pooled
// [B, C / (1 + overlap)] fp32, written for the rows whose token closes a window (the others: undefined)
Tensor compress_step_(const Tensor &kv, const Tensor &gate, const Tensor &ape, Tensor &pend_kv, Tensor &pend_gate,
                      const Tensor &pos, int64_t ratio, bool overlap) {
    const char *op = "compress_step_";
    const int dt = float_code(kv, op, "kv");
    check_plain(kv, op, "kv");
    check_plain(gate, op, "gate");
    check_plain(ape, op, "ape");
    check_plain(pend_kv, op, "pend_kv");
    check_plain(pend_gate, op, "pend_gate");
    check_plain(pos, op, "pos");
    check_dtype(gate, kv.scalar_type(), op, "gate");
    TORCH_CHECK_VALUE(ratio >= 1, "v4c_native.compress_step_: ratio must be >= 1, got ", ratio);
    TORCH_CHECK_VALUE(kv.dim() == 3 && kv.size(1) == 1, "v4c_native.compress_step_: kv must be [B, 1, C], got shape ",
                      kv.sizes());
    const int64_t B = kv.size(0), C = kv.size(2), slots = (overlap ? 2 : 1) * ratio;
    TORCH_CHECK_VALUE(!overlap || C % 2 == 0, "v4c_native.compress_step_: with overlap C must be even, got ", C);
    check_fits_int(C, op, "width C");
    check_numel(gate, B * C, op, "gate", "[B, 1, C]");
    check_dtype(ape, at::kFloat, op, "ape");
    check_numel(ape, ratio * C, op, "ape", "[ratio, C]");
    for (const Tensor *t : {static_cast<const Tensor *>(&pend_kv), static_cast<const Tensor *>(&pend_gate)}) {
        check_dtype(*t, at::kFloat, op, "the pending slots");
        TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == B && t->size(1) == slots && t->size(2) == C,
                          "v4c_native.compress_step_: the pending slots must be [B, ", slots, ", C] = [", B, ", ", slots,
                          ", ", C, "], got shape ", t->sizes());
    }
    check_dtype(pos, at::kLong, op, "pos");
    check_numel(pos, B, op, "pos", "[B, 1]");
    Tensor pooled = at::empty({B, C / (overlap ? 2 : 1)}, kv.options().dtype(at::kFloat));
    const int rc = v4c_compress_step(B, int(C), int(ratio), overlap, dt, kv.data_ptr(), gate.data_ptr(),
                                     ape.data_ptr<float>(), pend_kv.data_ptr<float>(), pend_gate.data_ptr<float>(),
                                     pos.data_ptr<int64_t>(), pooled.data_ptr<float>());
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.compress_step_: a position is negative, or closes a CSA window that has "
                      "no predecessor (the general path takes those)");
    return pooled;
}

// the indexer's selection over plain keys (indexer.c): q [B, T, H, D], w [B, T, H] (one float dtype), keys
// [B, N, D] fp32 / bf16, pos [B, T]; returns [B, T, topk] row indices, -1 where fewer rows are visible
Tensor indexer_topk(const Tensor &q, const Tensor &w, const Tensor &keys, const Tensor &pos, int64_t topk,
                    int64_t ratio, double scale, std::optional<c10::string_view> isa_arg) {
    const char *op = "indexer_topk";
    const int qdt = float_code(q, op, "q"), kdt = float_code(keys, op, "keys");
    check_plain(q, op, "q");
    check_plain(w, op, "w");
    check_plain(keys, op, "keys");
    check_plain(pos, op, "pos");
    check_dtype(w, q.scalar_type(), op, "w");
    check_dtype(pos, at::kLong, op, "pos");
    TORCH_CHECK_VALUE(q.dim() == 4, "v4c_native.indexer_topk: q must be [B, T, H, D], got shape ", q.sizes());
    const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
    check_numel(w, B * T * H, op, "w", "[B, T, H]");
    check_numel(pos, B * T, op, "pos", "[B, T]");
    TORCH_CHECK_VALUE(keys.dim() == 3 && keys.size(0) == B && keys.size(2) == D, "v4c_native.indexer_topk: keys must "
                      "be [B, N, D] = [", B, ", N, ", D, "], got shape ", keys.sizes());
    TORCH_CHECK_VALUE(topk >= 1 && ratio >= 1, "v4c_native.indexer_topk: topk and ratio must be >= 1, got ", topk,
                      " and ", ratio);
    for (int64_t v : {H, D, topk, ratio}) check_fits_int(v, op, "size");
    TORCH_CHECK_VALUE(keys.size(1) <= INT32_MAX, "v4c_native.indexer_topk: too many key rows");
    // bf16 pairs (attention_bf16.c) for bf16 queries and keys, as attention() decides them
    const int named = isa_arg.has_value() ? pick_isa(isa_arg, keys.scalar_type(), op) : -1;
    const int pairs = qdt == 1 && kdt == 1 && (named > 0 ? named : v4c_best_isa(1)) == 3;
    Tensor out = at::empty({B, T, topk}, pos.options());
    const int nt = threads();
    const int64_t work = v4c_indexer_work(nt, int(H), int(D), keys.size(1));
    v4c_indexer_topk(nt, B, T, int(H), int(D), qdt, q.data_ptr(), w.data_ptr(), kdt, keys.data_ptr(), keys.size(1),
                     pos.data_ptr<int64_t>(), int(ratio), float(scale), int(topk), out.data_ptr<int64_t>(), pairs,
                     scratch(work / int64_t(sizeof(float)) + 16));
    return out;
}

// ---- quantised weights (quant.c) --------------------------------------------------------------

// the C code's format codes: 0 float32, 1 bfloat16 (plain weights), 2 FP8 e4m3 128x128, 3 MXFP4
constexpr int QF_FP8 = 2, QF_MXFP4 = 3;

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

Tensor qlinear(const Tensor &x, const Tensor &data, const Tensor &scale, c10::string_view fmt_arg, int64_t groups) {
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
    auto shape = x.sizes().vec();
    shape.back() = groups > 1 ? R : N;
    Tensor out = at::empty(shape, x.options());
    const int nt = threads();
    const int64_t work = v4c_qlinear_work(nt, int(t), int(groups), K, N);
    const int rc = v4c_qlinear(nt, fmt, dt, int(t), int(groups), R, K, x.data_ptr(), data.data_ptr(), bytes(scale),
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
                    const OptTensor &shared_down_scale, int64_t k, double limit) {
    const char *op = "moe_decode_q";
    const int dt = float_code(x, op, "x");
    check_plain(x, op, "x");
    TORCH_CHECK_VALUE(x.dim() == 2, "v4c_native.moe_decode_q: x must be [t, D], got shape ", x.sizes());
    const int64_t t = x.size(0), D = x.size(1);
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
    int sfmt = dt;
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
    Tensor out = at::empty_like(x);
    const int nt = threads();
    const int64_t work = v4c_moe_decode_q_work(nt, int(t), int(D), int(I), int(shared ? Is : 0), int(k), int(E));
    auto sp = [](const OptTensor &s) { return s.has_value() ? bytes(*s) : nullptr; };
    const int rc = v4c_moe_decode_q(
        nt, dt, int(t), int(D), int(I), int(shared ? Is : 0), int(k), int(E), x.data_ptr(),
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

void ring_append_(Tensor &ring, Tensor &ring_pos, const Tensor &kv, const Tensor &pos) {
    const char *op = "ring_append_";
    TORCH_CHECK_VALUE(ring.dim() == 3, "v4c_native.ring_append_: ring must be [B, W, D], got shape ", ring.sizes());
    const int64_t B = ring.size(0), W = ring.size(1), D = ring.size(2);
    TORCH_CHECK_VALUE(kv.dim() == 3 && kv.size(0) == B && kv.size(2) == D,
                      "v4c_native.ring_append_: kv must be [B, T, D] = [", B, ", T, ", D, "], got shape ", kv.sizes());
    const int64_t T = kv.size(1);
    TORCH_CHECK_VALUE(T <= W, "v4c_native.ring_append_: ", T, " tokens per row do not fit a ring of ", W, " slots");
    check_plain(ring, op, "ring");
    check_plain(kv, op, "kv");
    check_plain(ring_pos, op, "ring_pos");
    check_plain(pos, op, "pos");
    TORCH_CHECK_TYPE(kv.scalar_type() == ring.scalar_type(), "v4c_native.ring_append_: kv must have the ring's dtype ",
                     ring.scalar_type(), ", got ", kv.scalar_type());
    check_dtype(ring_pos, at::kLong, op, "ring_pos");
    check_dtype(pos, at::kLong, op, "pos");
    check_numel(ring_pos, B * W, op, "ring_pos", "[B, W]");
    check_numel(pos, B * T, op, "pos", "[B, T]");
    const int rc = v4c_ring_append(B, T, W, D, int(ring.element_size()), kv.data_ptr(), ring.data_ptr(),
                                   ring_pos.data_ptr<int64_t>(), pos.data_ptr<int64_t>());
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.ring_append_: positions must be >= 0 (no padding)");
}

// the team's entry points in use (addresses; 0 where none was found): a diagnostic for the tests
std::vector<int64_t> openmp_entries() {
    auto address = [](void *p) { return int64_t(reinterpret_cast<intptr_t>(p)); };
    return {address(openmp.parallel), address(openmp.thread_num), address(openmp.num_threads)};
}

} // namespace

TORCH_LIBRARY(v4c_native, m) {
    m.def("hc_mix(Tensor x, Tensor? y, Tensor? post, Tensor? comb, Tensor fn, Tensor base, Tensor scale, "
          "Tensor? norm_w, float eps, float hc_eps, int iters, bool head) -> (Tensor?, Tensor, Tensor?, Tensor?)");
    m.def("norm_rope_(Tensor(a!) x, Tensor? w, float eps, int rope_dim, Tensor? rot, bool norm=True) -> Tensor(a!)");
    m.def("ring_append_(Tensor(a!) ring, Tensor(b!) ring_pos, Tensor kv, Tensor pos) -> ()");
    m.def("attention(Tensor q, Tensor kv, Tensor ring, Tensor ring_pos, Tensor sinks, Tensor pos, Tensor? rows, "
          "Tensor? idx, str kind, int window, int ratio, float scale, str? isa=None) -> Tensor");
    m.def("moe_decode(Tensor x, Tensor w, Tensor perm, Tensor offsets, Tensor w13, Tensor w2, Tensor? shared_gate, "
          "Tensor? shared_up, Tensor? shared_down, int k, float limit, str? isa=None) -> Tensor");
    m.def("dot_isas(ScalarType dtype) -> str[]", &dot_isas);
    m.def("linear(Tensor x, Tensor w, int groups=1, str? isa=None) -> Tensor");
    m.def("openmp_entries() -> int[]", &openmp_entries);
    m.def("compress_step_(Tensor kv, Tensor gate, Tensor ape, Tensor(a!) pend_kv, Tensor(b!) pend_gate, Tensor pos, "
          "int ratio, bool overlap) -> Tensor");
    m.def("indexer_topk(Tensor q, Tensor w, Tensor keys, Tensor pos, int topk, int ratio, float scale, "
          "str? isa=None) -> Tensor");
    m.def("moe_route(Tensor scores, Tensor? bias, Tensor? table, Tensor? ids, int k, float scaling) -> "
          "(Tensor, Tensor, Tensor, Tensor)");
    m.def("sqrt_softplus_(Tensor(a!) x) -> Tensor(a!)");
    m.def("quant_supported() -> bool", &quant_supported);
    m.def("qlinear(Tensor x, Tensor data, Tensor scale, str fmt, int groups=1) -> Tensor");
    m.def("moe_decode_q(Tensor x, Tensor w, Tensor perm, Tensor offsets, str fmt, Tensor w13, Tensor w13_scale, "
          "Tensor w2, Tensor w2_scale, str? shared_fmt, Tensor? shared_gate, Tensor? shared_gate_scale, "
          "Tensor? shared_up, Tensor? shared_up_scale, Tensor? shared_down, Tensor? shared_down_scale, "
          "int k, float limit) -> Tensor");
}

TORCH_LIBRARY_IMPL(v4c_native, CPU, m) {
    m.impl("hc_mix", &hc_mix);
    m.impl("norm_rope_", &norm_rope_);
    m.impl("ring_append_", &ring_append_);
    m.impl("attention", &attention);
    m.impl("moe_decode", &moe_decode);
    m.impl("linear", &linear);
    m.impl("qlinear", &qlinear);
    m.impl("moe_decode_q", &moe_decode_q);
    m.impl("moe_route", &moe_route);
    m.impl("sqrt_softplus_", &sqrt_softplus_);
    m.impl("compress_step_", &compress_step_);
    m.impl("indexer_topk", &indexer_topk);
}
