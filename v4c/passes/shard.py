"""The sharding pass: one rank's graph of a world of N ranks.

Experts are split into contiguous ranges (the first ``E mod N`` ranks take one more). Attention is
either data-parallel (``attn=dp``: each rank runs its own sequences with whole attention layers and its
own KV cache; tokens reach the experts' ranks through an all-to-all dispatch and come back through an
all-to-all combine) or tensor-parallel (``attn=tp``: every rank sees every token and owns whole output
groups of heads; the output projection's partial sums and the experts' partial sums are all-reduced).
V4 has one KV head, so tensor parallelism keeps a full copy of the KV cache on every rank.

Params keep their checkpoint names; a sliced param's type is the slice's, and the graph's meta lists
each slice as ``[name, dim, start, stop]`` so the runtime reads only that part of the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError, GraphError
from ..graph.ir import Graph, Node
from ..graph.registry import get_op, operand
from ..graph.types import TensorType
from .base import Pass, PassManager, PassResult

LAYOUTS = ("dp", "tp")


@dataclass(frozen=True)
class Parallel:
    world: int
    ep: int
    attn: str

    def spec(self) -> str:
        return f"ep={self.ep},attn={self.attn}"


def parse_parallel(spec: str | None, world: int) -> Parallel:
    """``"ep=N,attn=dp|tp"`` (either part optional; default ``ep=world,attn=dp``) for ``world`` ranks."""
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world}")
    fields = {"ep": str(world), "attn": "dp"}
    for part in filter(None, (spec or "").split(",")):
        key, eq, val = part.strip().partition("=")
        if not eq or key not in fields:
            raise ConfigError(f"--parallel: bad item {part!r}; expected ep=N and/or attn=dp|tp")
        fields[key] = val.strip()
    if not fields["ep"].isdigit() or int(fields["ep"]) not in (1, world):
        raise ConfigError(f"--parallel: ep={fields['ep']} must be 1 (experts on every rank) or the world size "
                          f"{world}")
    if fields["attn"] not in LAYOUTS:
        raise ConfigError(f"--parallel: attn={fields['attn']} must be dp or tp")
    return Parallel(world, int(fields["ep"]), fields["attn"])


def split(n: int, parts: int) -> list[int]:
    """Start of each part and then ``n``: contiguous, the first ``n mod parts`` parts one larger."""
    bounds = [0]
    for r in range(parts):
        bounds.append(bounds[-1] + n // parts + (r < n % parts))
    return bounds


def _layer(param: str) -> str:
    """``model.layers.N.self_attn`` of an attention param."""
    cut = param.find(".self_attn")
    if cut < 0:
        raise GraphError(f"shard: %{param} is not an attention param")
    return param[: cut + len(".self_attn")]


@dataclass
class Shard(Pass):
    """Rank ``rank``'s graph: its experts, its heads (tp) or its sequences (dp), with the collectives placed in the graph."""

    par: Parallel
    rank: int
    name = "shard"
    slices: dict = field(default_factory=dict)  # param -> (dim, start, stop)

    def run(self, g: Graph) -> PassResult:
        if self.par.world == 1:
            return PassResult(g, False)
        if not 0 <= self.rank < self.par.world:
            raise GraphError(f"shard: rank {self.rank} outside 0..{self.par.world - 1}")
        self.types = g.value_types()
        self.new_params = dict(g.params)
        self.slices = {}
        self.nodes: list[Node] = []
        self.groups = self._head_groups(g) if self.par.attn == "tp" else {}
        for node in g.nodes:
            handler = getattr(self, f"_{node.op}", None)
            if handler is None:
                self._emit(node.op, node.inputs, node.outputs, node.attr)
            else:
                handler(node)
        used = {i for n in self.nodes for i in n.inputs}
        used |= {f"{p}_scale_inv" for p in used}  # a quantised weight's scales travel with it
        params = tuple((n, self.new_params[n]) for n, _ in g.params if n in used)
        meta = {**dict(g.meta), "world_size": self.par.world, "rank": self.rank, "parallel": self.par.spec(),
                "shards": tuple((n, *self.slices[n]) for n, _ in params if n in self.slices)}
        return PassResult(g.replace(params=params, nodes=tuple(self.nodes), meta=tuple(sorted(meta.items()))), True)

    # -- helpers -------------------------------------------------------------------------------
    def _emit(self, op: str, inputs, outputs, attrs: dict) -> None:
        types = list(get_op(op).infer([self.types[i] for i in inputs], attrs))
        self.types.update(zip(outputs, types))
        self.nodes.append(Node.make(op, inputs, outputs, types, attrs))

    def _slice(self, name: str, dim: int, start: int, stop: int) -> str:
        t = self.new_params[name]
        if name in self.slices:
            raise GraphError(f"shard: param %{name} is sliced twice")
        shape = list(t.shape)
        shape[dim] = stop - start
        self.new_params[name] = self.types[name] = TensorType(tuple(shape), t.dtype)
        self.slices[name] = (dim, start, stop)
        scale = f"{name}_scale_inv"
        if scale in self.new_params:  # block scales are cut with their blocks, which must not straddle the cut
            st = self.new_params[scale]
            block = -(-t.shape[dim] // st.shape[dim]) if st.rank == t.rank else 0
            packed = t.dtype == "mxfp4" and dim == t.rank - 1  # two values a byte along K
            if not block or packed or start % block or (stop % block and stop != t.shape[dim]):
                raise GraphError(f"shard: %{name} is quantised in blocks of {block or '?'} along dim {dim}; "
                                 f"the slice [{start}, {stop}) cuts a block (use attn=dp)")
            s0, s1 = start // block, -(-stop // block)
            shape = list(st.shape)
            shape[dim] = s1 - s0
            self.new_params[scale] = self.types[scale] = TensorType(tuple(shape), st.dtype)
            self.slices[scale] = (dim, s0, s1)
        return name

    def _experts(self, w13: str) -> tuple[int, int]:
        e = self.types[w13].shape[0]
        if e < self.par.ep:
            raise ConfigError(f"ep={self.par.ep}: a layer has only {e} routed experts ({w13}); every rank needs one")
        b = split(e, self.par.ep)
        return b[self.rank], b[self.rank + 1]

    def _head_groups(self, g: Graph) -> dict:
        """Attention prefix -> its output groups, checked to split over the ranks in whole groups of whole heads."""
        out, heads = {}, {}
        for n in g.nodes:
            if n.op == "attention":
                raise GraphError("shard: attn=tp needs the fused attention (q_proj, sparse_attention, o_proj); "
                                 "compile without --no-fuse")
            if n.op == "q_proj":
                heads[_layer(operand(n, "w"))] = n.attr["shape"][2]
            if n.op == "o_proj":
                groups, wa = n.attr["groups"], operand(n, "wa")
                if groups < self.par.world:
                    raise ConfigError(f"attn=tp: {groups} output groups ({wa}) cannot be split over "
                                      f"{self.par.world} ranks; each rank owns whole groups (use attn=dp)")
                out[_layer(wa)] = groups
        for layer, groups in out.items():  # a rank's heads are its groups' channels: they must be whole heads
            h = heads.get(layer)
            if isinstance(h, int) and any(g * h % groups for g in split(groups, self.par.world)):
                raise ConfigError(f"attn=tp: {h} attention heads in {groups} output groups cannot be split over "
                                  f"{self.par.world} ranks in whole heads ({layer}); each rank owns whole groups of "
                                  f"whole heads (use attn=dp)")
        return out

    def _heads(self, param: str, heads: int) -> tuple[int, int, int, int]:
        """(first head, last head, first group, last group) of this rank in the layer of ``param``."""
        groups = self.groups[_layer(param)]
        gb = split(groups, self.par.world)
        g0, g1 = gb[self.rank], gb[self.rank + 1]
        return g0 * heads // groups, g1 * heads // groups, g0, g1  # (whole heads: _head_groups checked)

    # -- attention, tensor-parallel ------------------------------------------------------------
    def _q_proj(self, n: Node) -> None:
        if self.par.attn != "tp":
            return self._emit(n.op, n.inputs, n.outputs, n.attr)
        a = n.attr
        b, t, heads, dh = a["shape"]
        w = operand(n, "w")
        h0, h1, _, _ = self._heads(w, heads)
        self._slice(w, 0, h0 * dh, h1 * dh)
        self._emit(n.op, n.inputs, n.outputs, {**a, "shape": (b, t, h1 - h0, dh)})

    def _sparse_attention(self, n: Node) -> None:
        if self.par.attn == "tp":  # the sinks: one per head
            sinks = operand(n, "sinks")
            h0, h1, _, _ = self._heads(sinks, self.types[sinks].shape[0])
            self._slice(sinks, 0, h0, h1)
        self._emit(n.op, n.inputs, n.outputs, n.attr)

    def _o_proj(self, n: Node) -> None:
        if self.par.attn != "tp":
            return self._emit(n.op, n.inputs, n.outputs, n.attr)
        a = n.attr
        wa, wb = operand(n, "wa"), operand(n, "wb")
        groups = a["groups"]
        rank_r = self.types[wa].shape[0] // groups
        _, _, g0, g1 = self._heads(wa, groups)
        self._slice(wa, 0, g0 * rank_r, g1 * rank_r)
        self._slice(wb, 1, g0 * rank_r, g1 * rank_r)
        b, t, _, width = a["shape"]
        attrs = {**a, "groups": g1 - g0, "shape": (b, t, g1 - g0, width), "out_shape": (b, t, (g1 - g0) * rank_r)}
        partial = f"{n.outputs[0]}.partial"
        self._emit(n.op, n.inputs, (partial,), attrs)
        self._emit("all_reduce", (partial,), n.outputs, {"world": self.par.world})

    # -- experts -------------------------------------------------------------------------------
    def _moe_ffn(self, n: Node) -> None:
        shared = tuple(v for v in (operand(n, s) for s in ("sg", "su", "sd")) if v is not None)
        self._moe(n, operand(n, "h"), shared)

    def _moe_experts(self, n: Node) -> None:
        self._moe(n, operand(n, "x"), ())

    def _moe(self, n: Node, h: str, shared) -> None:
        if self.par.ep == 1:
            return self._emit(n.op, n.inputs, n.outputs, n.attr)
        w13, w2 = operand(n, "w13"), operand(n, "w2")
        experts = self.types[w13].shape[0]
        e0, e1 = self._experts(w13)
        self._slice(w13, 0, e0, e1)
        self._slice(w2, 0, e0, e1)
        idx, w = operand(n, "idx"), operand(n, "w")
        out = n.outputs[0]
        ffn = n.op == "moe_ffn"
        if self.par.attn == "tp":  # every rank holds every token: run local experts, sum the partial outputs
            sel = tuple(f"{out}.ep.{s}" for s in ("experts", "weights", "perm", "offsets"))
            self._emit("ep_select", (idx, w), sel, {"experts": (e0, e1)})
            extra = tuple(shared) if self.rank == 0 else ()  # the shared expert counted once, on rank 0
            ins = (h, *sel, w13, w2, *extra) if ffn else (h, sel[0], sel[1], w13, w2)
            self._emit(n.op, ins, (f"{out}.partial",), n.attr)
            self._emit("all_reduce", (f"{out}.partial",), (out,), {"world": self.par.world})
            return
        # data-parallel tokens: send each assignment to its expert's rank and bring the result back
        bounds = tuple(split(experts, self.par.ep))
        d = tuple(f"{out}.ep.{s}" for s in ("rows", "experts", "weights", "perm", "offsets", "order", "counts"))
        self._emit("ep_dispatch", (h, idx, w), d, {"bounds": bounds, "rank": self.rank})
        ins = (d[0], d[1], d[2], d[3], d[4], w13, w2) if ffn else (d[0], d[1], d[2], w13, w2)
        self._emit(n.op, ins, (f"{out}.ep.y",), n.attr)
        routed = f"{out}.routed" if shared else out
        self._emit("ep_combine", (f"{out}.ep.y", d[5], d[6]), (routed,), {})
        if shared:  # the shared expert runs where its tokens are
            sg, su, sd = shared
            lim = n.attr["limit"]
            self._emit("linear", (h, sg), (f"{out}.shared_gate",), {})
            self._emit("linear", (h, su), (f"{out}.shared_up",), {})
            self._emit("swiglu", (f"{out}.shared_gate", f"{out}.shared_up"), (f"{out}.shared_act",), {"limit": lim})
            self._emit("linear", (f"{out}.shared_act", sd), (f"{out}.shared",), {})
            self._emit("add", (routed, f"{out}.shared"), (out,), {})


def shard_graph(g: Graph, par: Parallel, rank: int, log=None) -> Graph:
    """Rank ``rank``'s graph, verified (the pass manager runs the verifier after the pass)."""
    pm = PassManager([Shard(par, rank)], out=log or (lambda s: None))
    return pm.run(g)


def shard_all(g: Graph, world: int, parallel: str | None, log=None) -> tuple[Parallel, list[Graph]]:
    """Every rank's graph for ``world`` ranks laid out as ``parallel`` (``"ep=N,attn=dp|tp"``)."""
    par = parse_parallel(parallel, world)
    return par, [shard_graph(g, par, r, log) for r in range(world)]


def parallel_plan(par: Parallel, graphs: list[Graph]) -> dict:
    """The per-rank plan as plain data: the world size and layout, and for each rank its param bytes and
    its slices (``[name, dim, start, stop]``). Where it and each rank's graph go is the artifact
    writer's business (``ArtifactWriter.set_parallel``)."""
    ranks = [{"rank": r, "param_bytes": sum(t.nbytes() for _, t in g.params),
              "shards": [list(s) for s in dict(g.meta).get("shards", ())]} for r, g in enumerate(graphs)]
    return {"world_size": par.world, "ep": par.ep, "attn": par.attn, "ranks": ranks}
