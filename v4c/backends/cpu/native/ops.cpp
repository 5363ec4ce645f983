// The C helpers as PyTorch operators: the schemas of the `v4c_native` namespace (TORCH_LIBRARY) and
// their CPU kernels (TORCH_LIBRARY_IMPL), which check every operand's dtype, shape, device and
// layout (an error with the operand's name, never a crash), allocate the outputs and hand raw
// pointers to the C code (compiled as C and linked in). This file: the mHC mixes (mhc.c), the
// RMSNorm + RoPE epilogue (norm_rope.c), the ring and attention (attention.c), the compressor's step
// (compress.c), the indexer (indexer.c); ops_products.cpp: the dot-product kernels' operators (the MoE,
// the dense products, the router); ops.h: what both share.
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

#include "ops.h"

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
int v4c_attention(int threads, int B, int T, int H, int D, int qdt, int kdt, int kind, int window, int ratio, const void *q,
                  const void *kv, const void *ring, const int64_t *ring_pos, int W, const float *sinks,
                  const int64_t *pos, const void *rows, int N, const int64_t *idx, int K, float scale, int pairs, void *out);
int v4c_best_isa(int wdt);
int v4c_use_openmp(void *parallel, void *thread_num, void *num_threads);
int v4c_compress_step(long B, int C, int ratio, int overlap, int dt, const void *kv, const void *gate,
                      const float *ape, float *pend_kv, float *pend_gate, const int64_t *pos, float *pooled);
int v4c_compress_prefill(int threads, long B, long T, int C, int ratio, int overlap, int dt, const void *kv,
                         const void *gate, const float *ape, float *pend_kv, float *pend_gate, const int64_t *pos,
                         float *pooled, int64_t *win, long W);
long v4c_indexer_work(int threads, int H, int D, long n);
int v4c_indexer_topk(int threads, long B, long T, int H, int D, int qdt, const void *q, const void *w, int kdt,
                     const void *keys, long N, const int64_t *pos, int ratio, float scale, int topk, int64_t *out,
                     int pairs, void *work);
}

using namespace v4c_native_ops;

namespace {

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
        const auto wt = norm_w->scalar_type();  // the C mixes read fp32, bf16 and fp16 weights as they are
        w = wt == at::kBFloat16 || wt == at::kHalf ? norm_w->contiguous() : as_f32(*norm_w, op, "norm_w");
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
    // the queries (and the output) in the model's dtype; the keys (kv, ring, rows) in one dtype of their own: the
    // cache's (an fp32 or fp16 model over a bf16 cache)
    const int qdt = float_code(q, op, "q"), kdt = float_code(kv, op, "kv");
    const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
    for (int64_t v : {B, T, H, D}) check_fits_int(v, op, "size");
    check_plain(q, op, "q");
    auto same_dtype = [&](const Tensor &t, const char *name) {
        TORCH_CHECK_TYPE(t.scalar_type() == kv.scalar_type(), "v4c_native.attention: ", name,
                         " must have kv's dtype ", kv.scalar_type(), ", got ", t.scalar_type());
        check_plain(t, op, name);
    };
    auto int64s = [&](const Tensor &t, const char *name) {
        check_dtype(t, at::kLong, op, name);
        check_plain(t, op, name);
    };
    check_plain(kv, op, "kv");
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
    const int pairs = qdt == 1 && kdt == 1 && (named > 0 ? named : v4c_best_isa(1)) == 3;
    Tensor out = at::empty_like(q);
    const int rc = v4c_attention(threads(), int(B), int(T), int(H), int(D), qdt, kdt, k, int(window), int(ratio),
                                 q.data_ptr(), kv.data_ptr(), ring.data_ptr(), ring_pos.data_ptr<int64_t>(), int(W),
                                 s.data_ptr<float>(), pos.data_ptr<int64_t>(), N ? rows->data_ptr() : nullptr, int(N),
                                 K ? idx->data_ptr<int64_t>() : nullptr, int(K), float(scale), pairs, out.data_ptr());
    TORCH_CHECK_VALUE(rc != -1, "attention: kind '", kind, "' with ratio ", ratio, " is not one the C helpers take");
    TORCH_CHECK_WITH(OutOfMemoryError, rc == 0, "v4c_native.attention: could not allocate scratch memory");
    return out;
}

// the operands of the compressor's C steps after their products: kv, gate [B, T, C] (fp32 / bf16 / fp16), ape
// [ratio, C] fp32, pend_kv / pend_gate [B, slots, C] fp32, pos [B, T]; returns kv's dtype code
static int check_compress(const char *op, const Tensor &kv, const Tensor &gate, const Tensor &ape, const Tensor &pend_kv,
                          const Tensor &pend_gate, const Tensor &pos, int64_t ratio, bool overlap) {
    const int dt = float_code(kv, op, "kv");
    check_plain(kv, op, "kv");
    check_plain(gate, op, "gate");
    check_plain(ape, op, "ape");
    check_plain(pend_kv, op, "pend_kv");
    check_plain(pend_gate, op, "pend_gate");
    check_plain(pos, op, "pos");
    check_dtype(gate, kv.scalar_type(), op, "gate");
    TORCH_CHECK_VALUE(ratio >= 1, "v4c_native.", op, ": ratio must be >= 1, got ", ratio);
    TORCH_CHECK_VALUE(kv.dim() == 3, "v4c_native.", op, ": kv must be [B, T, C], got shape ", kv.sizes());
    const int64_t B = kv.size(0), T = kv.size(1), C = kv.size(2), slots = (overlap ? 2 : 1) * ratio;
    TORCH_CHECK_VALUE(!overlap || C % 2 == 0, "v4c_native.", op, ": with overlap C must be even, got ", C);
    check_fits_int(C, op, "width C");
    check_numel(gate, B * T * C, op, "gate", "[B, T, C]");
    check_dtype(ape, at::kFloat, op, "ape");
    check_numel(ape, ratio * C, op, "ape", "[ratio, C]");
    for (const Tensor *t : {&pend_kv, &pend_gate}) {
        check_dtype(*t, at::kFloat, op, "the pending slots");
        TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == B && t->size(1) == slots && t->size(2) == C, "v4c_native.", op,
                          ": the pending slots must be [B, ", slots, ", C] = [", B, ", ", slots, ", ", C,
                          "], got shape ", t->sizes());
    }
    check_dtype(pos, at::kLong, op, "pos");
    check_numel(pos, B * T, op, "pos", "[B, T]");
    return dt;
}

// the compressor's decode step after its products (compress.c): kv, gate [B, 1, C] (fp32 / bf16 / fp16), ape
// [ratio, C] fp32, pend_kv / pend_gate [B, slots, C] fp32 (updated in place), pos [B, 1]; returns pooled
// [B, C / (1 + overlap)] fp32, written for the rows whose token closes a window (the others: undefined)
Tensor compress_step_(const Tensor &kv, const Tensor &gate, const Tensor &ape, Tensor &pend_kv, Tensor &pend_gate,
                      const Tensor &pos, int64_t ratio, bool overlap) {
    const char *op = "compress_step_";
    const int dt = check_compress(op, kv, gate, ape, pend_kv, pend_gate, pos, ratio, overlap);
    TORCH_CHECK_VALUE(kv.size(1) == 1, "v4c_native.compress_step_: kv must be [B, 1, C], got shape ", kv.sizes());
    const int64_t B = kv.size(0), C = kv.size(2);
    Tensor pooled = at::empty({B, C / (overlap ? 2 : 1)}, kv.options().dtype(at::kFloat));
    const int rc = v4c_compress_step(B, int(C), int(ratio), overlap, dt, kv.data_ptr(), gate.data_ptr(),
                                     ape.data_ptr<float>(), pend_kv.data_ptr<float>(), pend_gate.data_ptr<float>(),
                                     pos.data_ptr<int64_t>(), pooled.data_ptr<float>());
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.compress_step_: a position is negative, or closes a CSA window that has "
                      "no predecessor (the general path takes those)");
    return pooled;
}

// a prefill call's compressor after its products (compress.c): the operands of compress_step_ with T tokens a
// row (positions consecutive from the row's first, padding -1 after them); returns the windows each row closes,
// pooled [B, W, C / (1 + overlap)] fp32 and their indices win [B, W] (-1 past a row's last), W = T / ratio + 1
std::tuple<Tensor, Tensor> compress_prefill_(const Tensor &kv, const Tensor &gate, const Tensor &ape, Tensor &pend_kv,
                                             Tensor &pend_gate, const Tensor &pos, int64_t ratio, bool overlap) {
    const char *op = "compress_prefill_";
    const int dt = check_compress(op, kv, gate, ape, pend_kv, pend_gate, pos, ratio, overlap);
    const int64_t B = kv.size(0), T = kv.size(1), C = kv.size(2), W = T / ratio + 1;
    Tensor pooled = at::empty({B, W, C / (overlap ? 2 : 1)}, kv.options().dtype(at::kFloat));
    Tensor win = at::empty({B, W}, pos.options());
    const int rc = v4c_compress_prefill(threads(), B, T, int(C), int(ratio), overlap, dt, kv.data_ptr(),
                                        gate.data_ptr(), ape.data_ptr<float>(), pend_kv.data_ptr<float>(),
                                        pend_gate.data_ptr<float>(), pos.data_ptr<int64_t>(), pooled.data_ptr<float>(),
                                        win.data_ptr<int64_t>(), W);
    TORCH_CHECK_WITH(OutOfMemoryError, rc != -2, "v4c_native.compress_prefill_: could not allocate its row tables");
    TORCH_CHECK_VALUE(rc == 0, "v4c_native.compress_prefill_: a row's positions must run on from its first, "
                      "padding (negative) after them");
    return {pooled, win};
}

// y [..., N] viewed as [..., heads, N / heads]
static Tensor split_heads(const Tensor &y, int64_t heads, const char *op) {
    auto s = y.sizes().vec();
    TORCH_CHECK_VALUE(heads >= 1 && s.back() % heads == 0, "v4c_native.", op, ": ", s.back(), " outputs are not ",
                      heads, " heads");
    const int64_t d = s.back() / heads;
    s.back() = heads;
    s.push_back(d);
    return y.view(s);
}

// a decode call's projection and its epilogue in one operator: y = x @ w.T (linear.c), viewed as
// [..., heads, N / heads] when heads >= 1 (0: no head axis), then norm_rope_ in place (RMSNorm times norm_w, or none; RoPE with rot,
// or none when rope_dim is 0): the q / kv projections and linear_rms_norm, as their two operators compute them
Tensor linear_norm_rope(const Tensor &x, const Tensor &w, int64_t heads, const OptTensor &norm_w, double eps,
                        int64_t rope_dim, const OptTensor &rot) {
    Tensor y = dense_linear(x.contiguous(), w);
    TORCH_CHECK_VALUE(heads >= 0, "v4c_native.linear_norm_rope: heads must be >= 0 (0: no head axis), got ", heads);
    if (heads > 0) y = split_heads(y, heads, "linear_norm_rope");
    return norm_rope_(y, norm_w ? OptTensor(norm_w->contiguous()) : std::nullopt, eps, rope_dim, rot, true);
}

// a decode call's compressor step with its two products (linear.c) in one operator: the same results as the
// two `linear` operators and `compress_step_` one by one
Tensor compress_decode_(const Tensor &h, const Tensor &wkv, const Tensor &wgate, const Tensor &ape, Tensor &pend_kv,
                        Tensor &pend_gate, const Tensor &pos, int64_t ratio, bool overlap) {
    const Tensor x = h.contiguous();
    return compress_step_(dense_linear(x, wkv), dense_linear(x, wgate), as_f32(ape, "compress_decode_", "ape"),
                          pend_kv, pend_gate, pos, ratio, overlap);
}

// the windows a compressor step closes, written to the plain row store: for each row b whose position p closes
// a window ((p + 1) % ratio == 0), its pooled row (pooled [B, d] fp32 from compress_step_ / compress_decode_)
// gets RMSNorm (norm_w) and RoPE at position (p / ratio) * ratio (table [P, rope_dim / 2] complex: the exact
// rotations of rope.py's table), in place, and is stored, in rows' dtype, at rows[b, p / ratio]; the same
// roundings as norm_rope_ on the gathered rows and the store's `.to(dtype)` one by one
void compress_close_(Tensor &pooled, const Tensor &pos, int64_t ratio, const Tensor &norm_w, double eps,
                     int64_t rope_dim, const Tensor &table, Tensor &rows) {
    const char *op = "compress_close_";
    check_plain(pooled, op, "pooled");
    check_dtype(pooled, at::kFloat, op, "pooled");
    check_plain(pos, op, "pos");
    check_dtype(pos, at::kLong, op, "pos");
    TORCH_CHECK_VALUE(ratio >= 1, "v4c_native.compress_close_: ratio must be >= 1, got ", ratio);
    TORCH_CHECK_VALUE(pooled.dim() == 2, "v4c_native.compress_close_: pooled must be [B, d], got shape ",
                      pooled.sizes());
    const int64_t B = pooled.size(0), d = pooled.size(1);
    check_numel(pos, B, op, "pos", "[B, 1]");
    TORCH_CHECK_VALUE(rows.dim() == 3 && rows.size(0) == B && rows.size(2) == d,
                      "v4c_native.compress_close_: rows must be [B, N, d] = [", B, ", N, ", d, "], got shape ",
                      rows.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(rows.scalar_type()), "v4c_native.compress_close_: rows must be a plain "
                     "floating-point store, got ", rows.scalar_type());
    TORCH_CHECK(rows.device().is_cpu(), "v4c_native.compress_close_: rows must be on the CPU, got ", rows.device());
    TORCH_CHECK_TYPE(table.scalar_type() == at::kComplexFloat, "v4c_native.compress_close_: table must be complex64, "
                     "got ", table.scalar_type());
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) * 2 == rope_dim, "v4c_native.compress_close_: table must be "
                      "[P, rope_dim / 2] = [P, ", rope_dim / 2, "], got shape ", table.sizes());
    const int64_t *p = pos.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++) {
        if (p[b] < 0 || (p[b] + 1) % ratio != 0) continue;
        const int64_t win = p[b] / ratio;
        TORCH_CHECK_VALUE(win < rows.size(1), "v4c_native.compress_close_: window ", win, " of row ", b,
                          " is past the store's ", rows.size(1), " rows");
        TORCH_CHECK_VALUE(win * ratio < table.size(0), "v4c_native.compress_close_: position ", win * ratio,
                          " is past the table's ", table.size(0), " rotations");
        Tensor x = pooled.select(0, b).view({1, 1, d});
        norm_rope_(x, norm_w, eps, rope_dim, table.select(0, win * ratio).view({1, 1, rope_dim / 2}), true);
        rows.select(0, b).select(0, win).copy_(x.view({d}));
    }
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

// a decode call's whole indexer in one operator: the query product (linear.c) viewed as [..., heads, d] and
// rotated (rot: [B, T, rope_dim/2] complex), the head weights' product, the selection: the same steps as the
// four operators one by one (the q / w products in cq's and h's dtype, as the selection reads them)
Tensor indexer_step(const Tensor &cq, const Tensor &wq, const Tensor &h, const Tensor &ww, const Tensor &keys,
                    const Tensor &pos, int64_t heads, int64_t rope_dim, const Tensor &rot, int64_t topk, int64_t ratio,
                    double scale) {
    Tensor q = split_heads(dense_linear(cq.contiguous(), wq), heads, "indexer_step");
    if (rope_dim > 0) norm_rope_(q, std::nullopt, 0.0, rope_dim, rot, false);
    const Tensor w = dense_linear(h.contiguous(), ww);
    return indexer_topk(q, w, keys.contiguous(), pos.contiguous(), topk, ratio, scale, std::nullopt);
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

// a decode call's sparse_attention in one operator: the attention, the ring append of the call's kv (after the
// attention has read the ring), the inverse RoPE of the output (rot: the conjugate rotations, [B, T, rope_dim/2]
// complex; rope_dim 0: none), the same steps as the three operators one by one
Tensor attention_step_(const Tensor &q, const Tensor &kv, Tensor &ring, Tensor &ring_pos, const Tensor &sinks,
                       const Tensor &pos, const OptTensor &rows, const OptTensor &idx, c10::string_view kind,
                       int64_t window, int64_t ratio, double scale, const OptTensor &rot, int64_t rope_dim) {
    TORCH_CHECK_VALUE(rope_dim == 0 || rot.has_value(), "v4c_native.attention_step_: rope_dim ", rope_dim,
                      " needs rot");
    Tensor out = attention(q, kv, ring, ring_pos, sinks, pos, rows, idx, kind, window, ratio, scale, std::nullopt);
    ring_append_(ring, ring_pos, kv, pos);
    if (rope_dim > 0) norm_rope_(out, std::nullopt, 0.0, rope_dim, rot, false);
    return out;
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
    m.def("openmp_entries() -> int[]", &openmp_entries);
    m.def("compress_step_(Tensor kv, Tensor gate, Tensor ape, Tensor(a!) pend_kv, Tensor(b!) pend_gate, Tensor pos, "
          "int ratio, bool overlap) -> Tensor");
    m.def("compress_prefill_(Tensor kv, Tensor gate, Tensor ape, Tensor(a!) pend_kv, Tensor(b!) pend_gate, Tensor pos, "
          "int ratio, bool overlap) -> (Tensor, Tensor)");
    m.def("indexer_topk(Tensor q, Tensor w, Tensor keys, Tensor pos, int topk, int ratio, float scale, "
          "str? isa=None) -> Tensor");
    m.def("linear_norm_rope(Tensor x, Tensor w, int heads, Tensor? norm_w, float eps, int rope_dim, Tensor? rot) "
          "-> Tensor");
    m.def("indexer_step(Tensor cq, Tensor wq, Tensor h, Tensor ww, Tensor keys, Tensor pos, int heads, int rope_dim, "
          "Tensor rot, int topk, int ratio, float scale) -> Tensor");
    m.def("compress_decode_(Tensor h, Tensor wkv, Tensor wgate, Tensor ape, Tensor(a!) pend_kv, Tensor(b!) pend_gate, "
          "Tensor pos, int ratio, bool overlap) -> Tensor");
    m.def("attention_step_(Tensor q, Tensor kv, Tensor(a!) ring, Tensor(b!) ring_pos, Tensor sinks, Tensor pos, "
          "Tensor? rows, Tensor? idx, str kind, int window, int ratio, float scale, Tensor? rot, int rope_dim) -> Tensor");
    m.def("compress_close_(Tensor(a!) pooled, Tensor pos, int ratio, Tensor norm_w, float eps, int rope_dim, "
          "Tensor table, Tensor(b!) rows) -> ()");
}

TORCH_LIBRARY_IMPL(v4c_native, CPU, m) {
    m.impl("hc_mix", &hc_mix);
    m.impl("norm_rope_", &norm_rope_);
    m.impl("ring_append_", &ring_append_);
    m.impl("attention", &attention);
    m.impl("compress_step_", &compress_step_);
    m.impl("compress_prefill_", &compress_prefill_);
    m.impl("indexer_topk", &indexer_topk);
    m.impl("attention_step_", &attention_step_);
    m.impl("compress_decode_", &compress_decode_);
    m.impl("linear_norm_rope", &linear_norm_rope);
    m.impl("indexer_step", &indexer_step);
    m.impl("compress_close_", &compress_close_);
}
