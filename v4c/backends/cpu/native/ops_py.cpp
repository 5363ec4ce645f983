// The v4c_native operators as plain Python functions (a pybind11 module, `_v4c_native_py`), for decode steps.
//
// Why: a call through `torch.ops.v4c_native.<op>` from Python goes the boxed way: each argument becomes an
// IValue on a stack checked against the schema, then the kernel is unboxed again. With ten operands that is
// ~2 us in a warm loop and several times that inside a decode step, whose weights evict the dispatcher's
// working set between calls; a step makes ~100 such calls. Here pybind11 converts the arguments and each
// function makes the dispatcher's typed (unboxed) call to the same registered kernel: the same dispatch
// keys, inplace/view and version-counter handling and errors, without the boxing. The operators stay
// defined once, in ops.cpp / ops_products.cpp; this file only names their C++ signatures, and `typed<>`
// checks each against the kernel registered in this process when the module is imported (a mismatch is an
// import error, and the Python side then keeps torch.ops).
//
// Built after libv4c_native.so and linked to it by its soname, so importing this module finds the copy that
// torch.ops.load_library already loaded (a second copy would register the namespace again). Needs Python's
// headers; without them the build of this module fails alone and everything runs through torch.ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptStr = std::optional<std::string>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <class Sig> c10::TypedOperatorHandle<Sig> typed(const char *name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::optional<c10::string_view> view(const OptStr &s) {
    return s ? std::optional<c10::string_view>(c10::string_view(*s)) : std::nullopt;
}

// Python's GIL is released while the kernel runs, as torch.ops does (serving threads go on meanwhile).
using release = pybind11::call_guard<pybind11::gil_scoped_release>;

} // namespace

PYBIND11_MODULE(_v4c_native_py, m) {
    m.doc() = "v4c_native operators called through the dispatcher's unboxed path (see ops_py.cpp)";

    using HcMix = std::tuple<OptTensor, Tensor, OptTensor, OptTensor>(
        const Tensor &, const OptTensor &, const OptTensor &, const OptTensor &, const Tensor &, const Tensor &,
        const Tensor &, const OptTensor &, double, double, int64_t, bool);
    static const auto hc_mix = typed<HcMix>("v4c_native::hc_mix");
    m.def("hc_mix",
          [](const Tensor &x, const OptTensor &y, const OptTensor &post, const OptTensor &comb, const Tensor &fn,
             const Tensor &base, const Tensor &scale, const OptTensor &norm_w, double eps, double hc_eps,
             int64_t iters, bool head) {
              return hc_mix.call(x, y, post, comb, fn, base, scale, norm_w, eps, hc_eps, iters, head);
          },
          release());

    using NormRope = Tensor(Tensor &, const OptTensor &, double, int64_t, const OptTensor &, bool);
    static const auto norm_rope_ = typed<NormRope>("v4c_native::norm_rope_");
    m.def("norm_rope_",
          [](Tensor x, const OptTensor &w, double eps, int64_t rope_dim, const OptTensor &rot, bool norm) {
              return norm_rope_.call(x, w, eps, rope_dim, rot, norm);
          },
          release());

    using RingAppend = void(Tensor &, Tensor &, const Tensor &, const Tensor &);
    static const auto ring_append_ = typed<RingAppend>("v4c_native::ring_append_");
    m.def("ring_append_",
          [](Tensor ring, Tensor ring_pos, const Tensor &kv, const Tensor &pos) {
              ring_append_.call(ring, ring_pos, kv, pos);
          },
          release());

    using Attention = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                             const Tensor &, const OptTensor &, const OptTensor &, c10::string_view, int64_t, int64_t,
                             double, std::optional<c10::string_view>);
    static const auto attention = typed<Attention>("v4c_native::attention");
    m.def("attention",
          [](const Tensor &q, const Tensor &kv, const Tensor &ring, const Tensor &ring_pos, const Tensor &sinks,
             const Tensor &pos, const OptTensor &rows, const OptTensor &idx, const std::string &kind, int64_t window,
             int64_t ratio, double scale, const OptStr &isa) {
              return attention.call(q, kv, ring, ring_pos, sinks, pos, rows, idx, kind, window, ratio, scale,
                                    view(isa));
          },
          release());

    using AttentionStep = Tensor(const Tensor &, const Tensor &, Tensor &, Tensor &, const Tensor &, const Tensor &,
                                 const OptTensor &, const OptTensor &, c10::string_view, int64_t, int64_t, double,
                                 const OptTensor &, int64_t);
    static const auto attention_step_ = typed<AttentionStep>("v4c_native::attention_step_");
    m.def("attention_step_",
          [](const Tensor &q, const Tensor &kv, Tensor ring, Tensor ring_pos, const Tensor &sinks, const Tensor &pos,
             const OptTensor &rows, const OptTensor &idx, const std::string &kind, int64_t window, int64_t ratio,
             double scale, const OptTensor &rot, int64_t rope_dim) {
              return attention_step_.call(q, kv, ring, ring_pos, sinks, pos, rows, idx, kind, window, ratio, scale,
                                          rot, rope_dim);
          },
          release());

    using CompressStep = Tensor(const Tensor &, const Tensor &, const Tensor &, Tensor &, Tensor &, const Tensor &,
                                int64_t, bool);
    static const auto compress_step_ = typed<CompressStep>("v4c_native::compress_step_");
    m.def("compress_step_",
          [](const Tensor &kv, const Tensor &gate, const Tensor &ape, Tensor pend_kv, Tensor pend_gate,
             const Tensor &pos, int64_t ratio, bool overlap) {
              return compress_step_.call(kv, gate, ape, pend_kv, pend_gate, pos, ratio, overlap);
          },
          release());

    using CompressDecode = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, Tensor &, Tensor &,
                                  const Tensor &, int64_t, bool);
    static const auto compress_decode_ = typed<CompressDecode>("v4c_native::compress_decode_");
    m.def("compress_decode_",
          [](const Tensor &h, const Tensor &wkv, const Tensor &wgate, const Tensor &ape, Tensor pend_kv,
             Tensor pend_gate, const Tensor &pos, int64_t ratio, bool overlap) {
              return compress_decode_.call(h, wkv, wgate, ape, pend_kv, pend_gate, pos, ratio, overlap);
          },
          release());

    using CompressClose = void(Tensor &, const Tensor &, int64_t, const Tensor &, double, int64_t, const Tensor &,
                               Tensor &);
    static const auto compress_close_ = typed<CompressClose>("v4c_native::compress_close_");
    m.def("compress_close_",
          [](Tensor pooled, const Tensor &pos, int64_t ratio, const Tensor &norm_w, double eps, int64_t rope_dim,
             const Tensor &table, Tensor rows) {
              compress_close_.call(pooled, pos, ratio, norm_w, eps, rope_dim, table, rows);
          },
          release());

    using IndexerTopk = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, int64_t, int64_t,
                               double, std::optional<c10::string_view>);
    static const auto indexer_topk = typed<IndexerTopk>("v4c_native::indexer_topk");
    m.def("indexer_topk",
          [](const Tensor &q, const Tensor &w, const Tensor &keys, const Tensor &pos, int64_t topk, int64_t ratio,
             double scale, const OptStr &isa) {
              return indexer_topk.call(q, w, keys, pos, topk, ratio, scale, view(isa));
          },
          release());

    using LinearNormRope = Tensor(const Tensor &, const Tensor &, int64_t, const OptTensor &, double, int64_t,
                                  const OptTensor &);
    static const auto linear_norm_rope = typed<LinearNormRope>("v4c_native::linear_norm_rope");
    m.def("linear_norm_rope",
          [](const Tensor &x, const Tensor &w, int64_t heads, const OptTensor &norm_w, double eps, int64_t rope_dim,
             const OptTensor &rot) { return linear_norm_rope.call(x, w, heads, norm_w, eps, rope_dim, rot); },
          release());

    using IndexerStep = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                               const Tensor &, int64_t, int64_t, const Tensor &, int64_t, int64_t, double);
    static const auto indexer_step = typed<IndexerStep>("v4c_native::indexer_step");
    m.def("indexer_step",
          [](const Tensor &cq, const Tensor &wq, const Tensor &h, const Tensor &ww, const Tensor &keys,
             const Tensor &pos, int64_t heads, int64_t rope_dim, const Tensor &rot, int64_t topk, int64_t ratio,
             double scale) {
              return indexer_step.call(cq, wq, h, ww, keys, pos, heads, rope_dim, rot, topk, ratio, scale);
          },
          release());

    using MoeDecode = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                             const Tensor &, const OptTensor &, const OptTensor &, const OptTensor &, int64_t, double,
                             std::optional<c10::string_view>);
    static const auto moe_decode = typed<MoeDecode>("v4c_native::moe_decode");
    m.def("moe_decode",
          [](const Tensor &x, const Tensor &w, const Tensor &perm, const Tensor &offsets, const Tensor &w13,
             const Tensor &w2, const OptTensor &sg, const OptTensor &su, const OptTensor &sd, int64_t k,
             double limit, const OptStr &isa) {
              return moe_decode.call(x, w, perm, offsets, w13, w2, sg, su, sd, k, limit, view(isa));
          },
          release());

    using Linear = Tensor(const Tensor &, const Tensor &, int64_t, std::optional<c10::string_view>);
    static const auto linear = typed<Linear>("v4c_native::linear");
    m.def("linear",
          [](const Tensor &x, const Tensor &w, int64_t groups, const OptStr &isa) {
              return linear.call(x, w, groups, view(isa));
          },
          release());

    using MoeRoute = Tensors4(const Tensor &, const OptTensor &, const OptTensor &, const OptTensor &, int64_t, double);
    static const auto moe_route = typed<MoeRoute>("v4c_native::moe_route");
    m.def("moe_route",
          [](const Tensor &scores, const OptTensor &bias, const OptTensor &table, const OptTensor &ids, int64_t k,
             double scaling) { return moe_route.call(scores, bias, table, ids, k, scaling); },
          release());

    using SqrtSoftplus = Tensor &(Tensor &);
    static const auto sqrt_softplus_ = typed<SqrtSoftplus>("v4c_native::sqrt_softplus_");
    m.def("sqrt_softplus_", [](Tensor x) { return Tensor(sqrt_softplus_.call(x)); }, release());

    using OProjStep = Tensor(const Tensor &, const Tensor &, int64_t, const Tensor &, int64_t, at::IntArrayRef);
    static const auto o_proj_step = typed<OProjStep>("v4c_native::o_proj_step");
    m.def("o_proj_step",
          [](const Tensor &x, const Tensor &wa, int64_t groups, const Tensor &wb, int64_t lead,
             const std::vector<int64_t> &tail) { return o_proj_step.call(x, wa, groups, wb, lead, tail); },
          release());

    using RouterStep = Tensors4(const Tensor &, const Tensor &, const OptTensor &, const OptTensor &,
                                const OptTensor &, int64_t, double);
    static const auto router_step = typed<RouterStep>("v4c_native::router_step");
    m.def("router_step",
          [](const Tensor &x, const Tensor &w, const OptTensor &bias, const OptTensor &table, const OptTensor &ids,
             int64_t k, double scaling) { return router_step.call(x, w, bias, table, ids, k, scaling); },
          release());

    using QLinear = Tensor(const Tensor &, const Tensor &, const Tensor &, c10::string_view, int64_t,
                           std::optional<c10::string_view>);
    static const auto qlinear = typed<QLinear>("v4c_native::qlinear");
    m.def("qlinear",
          [](const Tensor &x, const Tensor &data, const Tensor &scale, const std::string &fmt, int64_t groups,
             const OptStr &isa) { return qlinear.call(x, data, scale, fmt, groups, view(isa)); },
          release());

    using MoeDecodeQ = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, c10::string_view,
                              const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                              std::optional<c10::string_view>, const OptTensor &, const OptTensor &,
                              const OptTensor &, const OptTensor &, const OptTensor &, const OptTensor &, int64_t,
                              double, std::optional<c10::string_view>);
    static const auto moe_decode_q = typed<MoeDecodeQ>("v4c_native::moe_decode_q");
    m.def("moe_decode_q",
          [](const Tensor &x, const Tensor &w, const Tensor &perm, const Tensor &offsets, const std::string &fmt,
             const Tensor &w13, const Tensor &w13_scale, const Tensor &w2, const Tensor &w2_scale,
             const OptStr &shared_fmt, const OptTensor &sg, const OptTensor &sgs, const OptTensor &su,
             const OptTensor &sus, const OptTensor &sd, const OptTensor &sds, int64_t k, double limit,
             const OptStr &isa) {
              return moe_decode_q.call(x, w, perm, offsets, fmt, w13, w13_scale, w2, w2_scale, view(shared_fmt), sg,
                                       sgs, su, sus, sd, sds, k, limit, view(isa));
          },
          release());
}
