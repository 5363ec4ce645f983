"""Time of one step from its kernels: each kernel at its roofline scaled by its family's efficiency
(max of FLOPs over the reachable peak and bytes over the reachable bandwidth), plus a fixed cost per
launch, plus each collective's latency and bytes over the interconnect. Nothing overlaps: kernels of a
step run one after the other, and collectives are not hidden behind compute (v4c overlaps nothing yet;
production stacks hide part of them, so this errs long at large batch on many ranks)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .devices import GPU
from .efficiency import Efficiency
from .kernels import KV_FAMILIES, Kernel

# what bounds a step's time: memory-bound kernels streaming weights (and activations), memory-bound
# kernels reading the KV cache, compute-bound kernels, collectives, launch overhead
TERMS = ("weights", "kv", "compute", "collectives", "launch")


@dataclass(frozen=True)
class StepTime:
    terms: dict = field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))  # seconds by term

    @property
    def seconds(self) -> float:
        return sum(self.terms.values())

    @property
    def bound(self) -> str:
        """The term that takes the largest share of the step."""
        return max(TERMS, key=lambda t: self.terms[t])

    def __add__(self, other: "StepTime") -> "StepTime":
        return StepTime({t: self.terms[t] + other.terms[t] for t in TERMS})

    def __mul__(self, k: float) -> "StepTime":
        return StepTime({t: v * k for t, v in self.terms.items()})

    __rmul__ = __mul__

    def mix(self, other: "StepTime", w: float) -> "StepTime":
        """(1 - w) of this step and w of ``other`` (interpolating between two batch sizes)."""
        return self * (1 - w) + other * w


def kernel_seconds(k: Kernel, g: GPU, eff: Efficiency, world: int) -> tuple[str, float, float]:
    """(term, seconds of work, seconds of launch overhead) of one kernel on ``world`` ranks."""
    if k.family == "collective":
        where = "nvlink" if world <= g.nvlink_domain else "network"
        return "collectives", eff.collective_latency_s[where] + k.bytes / (g.link(world) * eff.link), 0.0
    compute = k.flops / (g.peak(k.dtype) * eff.compute[k.family])
    hbm = eff.grouped_hbm(k.rows_per_expert) if k.family == "grouped_gemm" else eff.hbm[k.family]
    memory = k.bytes / (g.hbm * hbm)
    if compute > memory:
        term = "compute"
    else:
        term = "kv" if k.family in KV_FAMILIES else "weights"
    return term, max(compute, memory), k.launches * eff.launch_s


def step_time(kernels: list[Kernel], g: GPU, eff: Efficiency, world: int) -> StepTime:
    terms = dict.fromkeys(TERMS, 0.0)
    for k in kernels:
        term, work, launch = kernel_seconds(k, g, eff, world)
        terms[term] += work
        terms["launch"] += launch
    return StepTime(terms)
