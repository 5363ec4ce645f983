"""Writing ONNX nodes: a small emitter shared by the main graph and the ``ai.v4c`` function bodies.

Lowerings work on ``Val`` (an ONNX value name with its IR type) so that they can read ranks,
static dims and dtypes; what they create in between is plain value names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..graph.types import TensorType

OPSET = 18  # the standard domain's version every node and function body is written against
DOMAIN = "ai.v4c"  # custom domain of the fused ops (functions whose bodies are standard ONNX)
DOMAIN_VERSION = 1

ONNX_DTYPE = {
    "f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "f64": TensorProto.DOUBLE,
    "i64": TensorProto.INT64, "i32": TensorProto.INT32, "bool": TensorProto.BOOL, "u8": TensorProto.UINT8,
}
IR_DTYPE = {v: k for k, v in ONNX_DTYPE.items()}
_NP = {"f32": np.float32, "f64": np.float64, "i64": np.int64, "i32": np.int32, "bool": np.bool_, "u8": np.uint8,
       "f16": np.float16}


@dataclass(frozen=True)
class Val:
    name: str
    type: TensorType

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def rank(self) -> int:
        return self.type.rank


class Emitter:
    """Appends nodes to ``nodes``; fresh value names start with ``prefix``."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._n = 0

    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"{self.prefix}{hint}{self._n}"

    def __call__(self, op_type: str, *inputs: str, out: str | list[str] | None = None, n_out: int = 1,
                 domain: str = "", overload: str = "", **attrs):
        """Add one node; ``out`` names its output(s), else fresh names. Returns the output name(s)."""
        outs = [out] if isinstance(out, str) else list(out) if out else [self.fresh() for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=f"{self.prefix}{op_type}_{self._n}_{len(self.nodes)}",
                                domain=domain, **{k: v for k, v in attrs.items() if v is not None})
        if overload:
            node.overload = overload
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype: str, out: str | None = None) -> str:
        """A Constant node holding ``value`` (scalar or nested list) as ``dtype``."""
        if dtype == "bf16":  # numpy has no bfloat16: store as f32 and cast
            return self("Cast", self.const(value, "f32"), to=TensorProto.BFLOAT16, out=out)
        arr = np.asarray(value, dtype=_NP[dtype])
        return self("Constant", out=out, value=onnx.numpy_helper.from_array(arr, name=self.fresh("c")))

    def ints(self, *vals: int) -> str:
        """A 1-D int64 constant (shapes, axes, starts/ends)."""
        return self.const(list(vals), "i64")

    def scalar(self, v, dtype: str) -> str:
        return self.const(v, dtype)

    # -- conveniences ---------------------------------------------------------------------
    def cast(self, name: str, src: str, dst: str, out: str | None = None) -> str:
        if src == dst:
            return self("Identity", name, out=out) if out else name
        return self("Cast", name, to=ONNX_DTYPE[dst], out=out)

    def f32(self, v: Val) -> str:
        return self.cast(v.name, v.dtype, "f32")

    def slice(self, x: str, axis: int, start: int, end: int, step: int = 1, out: str | None = None) -> str:
        return self("Slice", x, self.ints(start), self.ints(end), self.ints(axis), self.ints(step), out=out)

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self("Unsqueeze", x, self.ints(*axes))

    def squeeze(self, x: str, *axes: int, out: str | None = None) -> str:
        return self("Squeeze", x, self.ints(*axes), out=out)

    def reduce(self, op: str, x: str, *axes: int, keepdims: int = 1, out: str | None = None) -> str:
        return self(op, x, self.ints(*axes), keepdims=keepdims, out=out)

    def finish(self, name: str, out: str) -> str:
        """Make ``name`` available as ``out`` (an Identity only when it is not already)."""
        return name if name == out else self("Identity", name, out=out)


def tensor_proto(name: str, data, dtype: str) -> onnx.TensorProto:
    """An initializer from a torch tensor (raw little-endian bytes; bf16 included)."""
    t = data.detach().contiguous().cpu()
    return helper.make_tensor(name, ONNX_DTYPE[dtype], list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes(),
                              raw=True)


def value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    """Symbolic dims become ``dim_param`` (``B``, ``T``), ints stay ints."""
    return helper.make_tensor_value_info(name, ONNX_DTYPE[t.dtype], [d for d in t.shape])
