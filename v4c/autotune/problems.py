"""What there is to tune in a graph: one problem per (kernel op, attribute signature) at the
shape bucket the runtime uses, with the shapes the search space and cost model read."""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass

import torch

from ..graph.ir import Graph, Node
from ..graph.registry import Concrete, Cost, get_op
from .buckets import bucket_for
from .devices import DeviceSpec, device_for_properties, device_for_target

DEFAULT_CONTEXT = 131072  # decode configs are chosen for this context unless told otherwise


class Shapes(dict):
    """The shapes a template's ``constraints`` reads: a dict (``inputs``, ``outputs``, ``attrs``,
    ``dtype``, GEMM ``M``/``N``/``K``) that also indexes like the list of input then output shapes."""

    def __getitem__(self, k):
        if isinstance(k, int):
            return (list(dict.__getitem__(self, "inputs")) + list(dict.__getitem__(self, "outputs")))[k]
        return dict.__getitem__(self, k)


@dataclass(frozen=True)
class Problem:
    op: str
    signature: str
    node: Node
    bucket: str
    tokens: int
    context: int
    batch: int
    dtypes: str
    quant: str

    def concrete(self, graph: Graph):
        bind = {"B": self.batch, "T": self.tokens, "L": self.context}
        types = graph.value_types()
        ins = [Concrete(types[v].concrete(bind), types[v].dtype) for v in self.node.inputs]
        outs = [Concrete(types[v].concrete(bind), types[v].dtype) for v in self.node.outputs]
        return ins, outs

    def cost(self, graph: Graph) -> Cost:
        ins, outs = self.concrete(graph)
        return get_op(self.op).cost(ins, outs, self.node.attr, self.context)

    def shapes(self, graph: Graph) -> dict:
        """The dict the templates' constraints and the cost model read."""
        ins, outs = self.concrete(graph)
        d = Shapes(inputs=[c.shape for c in ins], outputs=[c.shape for c in outs], attrs=self.node.attr,
                   dtype=graph.value_types()[self.node.inputs[0]].dtype)
        if len(ins) > 1 and len(ins[1].shape) == 2:  # GEMM-like: weight [N, K] as the second input
            d.update(M=max(1, ins[0].numel // max(1, ins[0].shape[-1])), N=ins[1].shape[0], K=ins[1].shape[1])
        return d


def signature(node: Node) -> str:
    return json.dumps(dict(node.attrs), sort_keys=True, separators=(",", ":"))


def problems(graph: Graph, ops, tokens: int = 1, context: int = DEFAULT_CONTEXT, batch: int = 1) -> list[Problem]:
    """One problem per distinct (op, attributes) among ``ops`` (the ops that have kernels)."""
    meta = dict(graph.meta)
    dtypes = meta.get("dtype", "f32")
    quant = f"kv={meta.get('kv_cache', 'plain')},idx={meta.get('indexer_cache', 'plain')}"
    seen, out = set(), []
    for n in graph.nodes:
        if n.op not in ops:
            continue
        sig = signature(n)
        if (n.op, sig) in seen:
            continue
        seen.add((n.op, sig))
        out.append(Problem(n.op, sig, n, bucket_for(tokens, context), tokens, context, batch, dtypes, quant))
    return out


def hardware_for(target: str) -> tuple[dict, DeviceSpec]:
    """The hardware fingerprint a compile for ``target`` looks records up with: this machine's GPU
    when it is of that architecture, else the device table's reference product."""
    if target == "cpu":
        return {"arch": "cpu", "sm_count": 0, "memory_bytes": 0, "product": "triton-interpreter"}, \
            device_for_target("cpu")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        arch = f"sm{p.major}{p.minor}"
        if arch == target:
            return ({"arch": arch, "sm_count": p.multi_processor_count, "memory_bytes": p.total_memory,
                     "product": p.name}, device_for_properties(arch, p.multi_processor_count, p.total_memory))
    spec = device_for_target(target)
    return {"arch": spec.arch, "sm_count": spec.sm_count, "memory_bytes": spec.hbm_bytes, "product": spec.name}, spec


def toolchain() -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"triton": tv, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
