"""Backends: per op, the implementations that can run a node, each with a checker that says why it
declines a call.

A backend is an ordered list of implementations per op (the first that accepts a call runs it) and
the backend it falls back to. The executor binds one implementation per node and per phase when a
model is loaded (``bind``), and the binding records what was chosen and why the others declined:
``v4c inspect --json`` (``implementations``) and ``Model.implementations()`` print it, and tests
select an implementation through ``Backend.only`` instead of patching module globals.

Three backends: ``reference`` (the ops' PyTorch definitions), ``cpu`` (fast PyTorch paths and the C
helpers, ``v4c/backends/cpu``) and ``triton`` (the artifact's kernels, ``v4c/backends/triton.py``,
built per artifact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from ..graph.ir import Graph, Node
from ..graph.registry import get_op
from ..graph.sites import site_id
from ..graph.types import DTYPES, QUANT_DTYPES, TensorType

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# A call of at most this many tokens (batch x length) is a decode step: the phase whose
# implementations are tuned for dispatch cost rather than for memory passes.
DECODE_TOKENS = 16
PHASES = ("decode", "prefill")
NAMES = ("reference", "cpu", "triton")
ALIASES = {"torch": "cpu"}  # the cpu backend's name before it was one


def phase_of(tokens: int) -> str:
    return "decode" if tokens <= DECODE_TOKENS else "prefill"


@dataclass(frozen=True)
class Call:
    """What a checker may look at: known when the model is loaded, before any data flows."""

    node: Node
    types: tuple[TensorType, ...]  # the node's input types, as the graph declares them
    device: str  # "cpu" or "cuda"
    phase: str  # "decode" or "prefill"
    site: str  # the node's call site id (the artifact's kernel tables are keyed by it)
    values: tuple[Any, ...] = ()  # the bound weights (None for activations and states)

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def attrs(self) -> dict:
        return self.node.attr

    def dtype(self, i: int) -> str | None:
        return self.types[i].dtype if i < len(self.types) else None

    def quantized(self, *which: int) -> bool:
        """Whether any of the inputs ``which`` (all inputs if none is named) is a quantised weight."""
        idx = which or range(len(self.types))
        return any(i < len(self.types) and self.types[i].dtype in QUANT_DTYPES for i in idx)


Check = Callable[[Call], "str | None"]


@dataclass(frozen=True)
class Impl:
    """One way to run an op. ``check(call)`` returns why it declines (None: it accepts); ``bind(call,
    ctx)`` makes the callable for one node (default: ``fn``), e.g. with weight re-layouts made once."""

    backend: str
    op: str
    name: str
    fn: Callable | None = None
    check: Check | None = None
    bind: Callable[[Call, Any], Callable] | None = None

    def declines(self, call: Call) -> str | None:
        return self.check(call) if self.check is not None else None

    def make(self, call: Call, ctx: Any) -> Callable:
        return self.bind(call, ctx) if self.bind is not None else self.fn


@dataclass
class Backend:
    """An ordered list of implementations per op, and the backend asked when all of them decline."""

    name: str
    impls: dict[str, list[Impl]] = field(default_factory=dict)
    fallback: "Backend | None" = None
    context: Callable[[], Any] = lambda: None  # per-model state of the bound callables (e.g. re-layouts)

    def add(self, op: str, name: str, check: Check | None = None, bind=None):
        """Decorator: register ``fn`` as implementation ``name`` of ``op``, after those already there."""
        def deco(fn):
            self.impls.setdefault(op, []).append(Impl(self.name, op, name, fn, check, bind))
            return fn
        return deco

    def candidates(self, op: str) -> Iterable[Impl]:
        yield from self.impls.get(op, ())
        if self.fallback is not None:
            yield from self.fallback.candidates(op)

    def impl(self, op: str, name: str) -> Impl:
        """Implementation ``name`` of ``op`` (this backend's or its fallback's)."""
        for i in self.candidates(op):
            if i.name == name:
                return i
        known = sorted({i.name for i in self.candidates(op)})
        raise KeyError(f"{self.name}: no implementation {name!r} of {op} (known: {', '.join(known)})")

    def callable(self, op: str, args, attrs: dict | None = None, name: str | None = None,
                 phase: str | None = None, ctx: Any = None) -> Callable:
        """The implementation of ``op`` this backend binds for a call on these very arguments (or the
        one named ``name``, whose checker must accept them: else ValueError with its reason), made as
        the executor makes it. How tests and benchmarks run one implementation on its own."""
        call = call_on(op, args, attrs or {}, phase)
        if name is None:
            impl = choose(self, call).impl
        else:
            impl = self.impl(op, name)
            why = impl.declines(call)
            if why is not None:
                raise ValueError(f"{impl.backend}.{name} declines this {op} call: {why}")
        return impl.make(call, self.context() if ctx is None else ctx)

    def only(self, op: str, name: str) -> "Backend":
        """This backend with ``op`` run by ``name`` alone (still subject to its checker): how tests pick
        an implementation."""
        picked = [self.impl(op, name)]
        impls = {**self.impls, op: picked}
        fallback = self.fallback
        if picked[0].backend != self.name:
            fallback = None  # the fallback's own implementation, named: not the rest of it
        return Backend(self.name, impls, fallback, self.context)


@dataclass(frozen=True)
class Choice:
    node: str  # the node's first output (its name in the IR text)
    op: str
    phase: str
    impl: Impl
    declined: tuple[tuple[str, str, str], ...]  # (backend, implementation, reason)

    def row(self) -> dict:
        return {"node": self.node, "op": self.op, "phase": self.phase, "backend": self.impl.backend,
                "implementation": self.impl.name,
                "declined": [{"backend": b, "implementation": n, "reason": r} for b, n, r in self.declined]}


class NoImplementation(RuntimeError):
    pass


def choose(backend: Backend, call: Call) -> Choice:
    declined = []
    for impl in backend.candidates(call.op):
        why = impl.declines(call)
        if why is None:
            return Choice(call.node.outputs[0], call.op, call.phase, impl, tuple(declined))
        declined.append((impl.backend, impl.name, why))
    reasons = "; ".join(f"{b}.{n}: {r}" for b, n, r in declined) or "none is registered"
    raise NoImplementation(f"node %{call.node.outputs[0]} ({call.op}): no implementation accepts it ({reasons})")


def _type_of(x) -> TensorType | None:
    if x is None or not hasattr(x, "shape"):
        return None
    fmt = getattr(x, "fmt", None)  # a QuantizedWeight: its storage format is its IR dtype
    dtype = fmt if fmt is not None else DTYPE_NAMES[x.dtype]
    return TensorType(tuple(int(d) for d in x.shape), dtype)


def call_on(op: str, args, attrs: dict, phase: str | None = None) -> Call:
    """The Call a node of ``op`` would make on these arguments (tensors, or None for absent ones)."""
    args = list(args)
    while args and args[-1] is None:  # trailing optional operands left out
        args.pop()
    types = tuple(_type_of(a) or TensorType((), "f32") for a in args)
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device = x.device.type if x is not None else "cpu"
    tokens = math.prod(args[0].shape[:2]) if args and hasattr(args[0], "shape") and len(args[0].shape) >= 2 else 1
    node = Node.make(op, [f"in{i}" for i in range(len(args))], ["out"], (), attrs)
    return Call(node, types, device, phase or phase_of(tokens), f"{op}:direct", tuple(args))


def calls(graph: Graph, device: str, phase: str, values: Mapping[str, Any] | None = None) -> list[Call]:
    types = graph.value_types()
    values = values or {}
    return [Call(n, tuple(types[v] for v in n.inputs), device, phase, site_id(n, types),
                 tuple(values.get(v) for v in n.inputs)) for n in graph.nodes]


def plan(graph: Graph, backend: Backend, device: str, values: Mapping[str, Any] | None = None) -> dict:
    """Phase -> one Choice per node, in graph order (what ``v4c inspect`` reports; nothing is bound)."""
    return {ph: [choose(backend, c) for c in calls(graph, device, ph, values)] for ph in PHASES}


def get_backend(name: str) -> Backend:
    """The built-in backend ``name`` (``triton`` is built per artifact: see ``backends.triton``)."""
    name = ALIASES.get(name, name)
    if name == "reference":
        from .reference import REFERENCE
        return REFERENCE
    if name == "cpu":
        from .cpu.registry import CPU
        return CPU
    raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {name!r}")


def reference_impl(op: str) -> Impl:
    return Impl("reference", op, "reference", get_op(op).ref)


def for_artifact(name: str | None, device_type: str, root, kernels: dict) -> Backend:
    """The backend ``name`` for a loaded artifact (None: triton on CUDA where the artifact has
    kernels, cpu otherwise); ``kernels`` is the manifest's kernel table."""
    name = ALIASES.get(name, name) if name is not None else (
        "triton" if device_type == "cuda" and kernels.get("ops") else "cpu")
    if name == "triton":
        from .triton import triton_backend
        return triton_backend(root, kernels, device_type)
    return get_backend(name)
