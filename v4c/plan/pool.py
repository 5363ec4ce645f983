"""One serving instance: the model on ``world`` GPUs in one layout, and what its steps cost.

Decode iterations (a decode step, or MTP's draft steps plus the verify step), prefill chunks and the
MTP block's draft steps are timed on rank 0's graph: every rank waits for the slowest at each
collective, and rank 0 holds the extra expert, the extra sequence and (tensor-parallel) the shared
expert. Step times at a fractional number of sequences per rank interpolate linearly between grid
points (each grid point is a full kernel-by-kernel evaluation)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..graph.analysis import cache_footprint
from ..inspect_ranks import sequences_per_rank
from .devices import GPU
from .efficiency import Efficiency
from .kernels import Kernel, layer_of, step_kernels
from .source import ModelSource
from .step import StepTime, step_time


@dataclass(frozen=True)
class Layout:
    world: int
    attn: str  # "dp" (each rank its own sequences) or "tp" (heads split, every rank sees every token)
    ep: int = 0  # ranks the experts are split over: the world (default) or 1 (every rank holds all)

    @property
    def experts_split(self) -> int:
        return self.ep or self.world

    @property
    def parallel(self) -> str | None:
        return f"ep={self.experts_split},attn={self.attn}" if self.world > 1 else None

    def describe(self) -> str:
        return f"{self.world} GPUs, {self.parallel}" if self.world > 1 else "1 GPU"


def batch_grid(x: float) -> tuple[int, int]:
    """Grid points around ``x`` sequences per rank: every integer up to 8, then two per octave (8, 12, 16,
    24, ...); the step time is close to linear between them."""
    if x < 8:
        lo = max(1, math.floor(x))
        return lo, lo if lo == x else lo + 1
    p = 2 ** math.floor(math.log2(x))
    points = (p, 3 * p // 2, 2 * p)
    lo = max(g for g in points if g <= x)
    return lo, min(g for g in points if g >= x)


@dataclass
class Pool:
    src: ModelSource
    gpu: GPU
    eff: Efficiency
    layout: Layout
    _cache: dict = field(default_factory=dict)
    _memory: dict = field(default_factory=dict)

    def __post_init__(self):
        self.graph = self.src.graph if self.layout.world == 1 else self.src.rank_graph(self.layout.world,
                                                                                       self.layout.parallel)
        cfg = self.src.config
        self.topk, self.experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        # FP4 experts multiply as W4A8 where the tensor cores have FP8 (and FP4: the MegaMoE / FlashInfer
        # MXFP4 paths), as W4A16 on Hopper (Marlin-style dequantisation to BF16)
        self.fp4_weights = "fp8" if self.gpu.has("fp4") else "bf16"
        self.mtp_layer = _mtp_layer(cfg)

    # ---- memory -----------------------------------------------------------------------------
    def _memo(self, key, make):
        if key not in self._memory:
            self._memory[key] = make()
        return self._memory[key]

    def weight_bytes(self) -> int:
        return self._memo("weights", lambda: sum(t.nbytes() for _, t in self.graph.params))

    def kv_bytes_per_sequence(self, context: int) -> int:
        return self._memo(("kv", context), lambda: cache_footprint(self.graph, context).total_bytes)

    def sequences_on_rank0(self, sequences: int) -> int:
        return sequences_per_rank(sequences, self.layout.world, self.layout.attn)[0]

    def mtp_bytes(self, sequences_on_rank: int) -> int:
        """The MTP block: one more decoder layer's weights (rank 0's share, as the layer it is costed as),
        its e/h projections (two D x D FP8 matrices) and its sliding-window ring per sequence."""
        i, d = self.mtp_layer, self.src.config.hidden_size
        weights = self._memo("mtp", lambda: sum(t.nbytes() for n, t in self.graph.params
                                                if n.startswith(f"model.layers.{i}.")))
        g = self.graph
        ring = self._memo("mtp-ring", lambda: sum(t.nbytes({"B": 1, "L": 1}) for n, t in g.states
                                                  if n.startswith(f"l{i}.") and g.state_decl(n).kind == "window"))
        return weights + 2 * d * d + ring * sequences_on_rank

    # ---- time -------------------------------------------------------------------------------
    def _kernels(self, per_rank: int, tokens: int, context: int, logits_rows=None, select=None) -> list[Kernel]:
        # tokens whose experts this rank's grouped GEMM serves: data-parallel ranks with split experts receive
        # every rank's tokens; with all experts at home a rank serves its own; tensor-parallel ranks see all
        spread = self.layout.attn == "dp" and self.layout.experts_split > 1
        routed = per_rank * tokens * (self.layout.world if spread else 1)
        return step_kernels(self.graph, batch=per_rank, tokens=tokens, context=context, topk=self.topk,
                            experts=self.experts, global_tokens=routed, fp4_weights=self.fp4_weights,
                            logits_rows=logits_rows, select=select)

    def _timed(self, kind: str, per_rank: int, tokens: int, context: int) -> StepTime:
        key = (kind, per_rank, tokens, context)
        if key not in self._cache:
            if kind == "forward":
                ks = self._kernels(per_rank, tokens, context)
            elif kind == "prefill":
                ks = self._kernels(per_rank, tokens, context, logits_rows=1)
            else:  # "draft": the MTP block alone
                ks = self._draft_kernels(per_rank, tokens, context)
            self._cache[key] = step_time(ks, self.gpu, self.eff, self.layout.world)
        return self._cache[key]

    def per_rank(self, sequences: float) -> float:
        return max(1.0, sequences / self.layout.world if self.layout.attn == "dp" else sequences)

    def _interpolated(self, kind: str, sequences: float, tokens: int, context: int) -> StepTime:
        x = self.per_rank(sequences)
        lo, hi = batch_grid(x)
        a = self._timed(kind, lo, tokens, context)
        return a if hi == lo else a.mix(self._timed(kind, hi, tokens, context), (x - lo) / (hi - lo))

    def forward(self, sequences: float, tokens: int, context: int) -> StepTime:
        """One call of the model on ``sequences`` sequences (over the whole pool) of ``tokens`` tokens."""
        return self._interpolated("forward", sequences, tokens, context)

    def draft(self, sequences: float, context: int) -> StepTime:
        """One MTP draft step: the MTP block and the LM head on one token per sequence."""
        return self._interpolated("draft", sequences, 1, context)

    def iteration(self, sequences: float, context: int, draft_tokens: int) -> StepTime:
        """What one decode iteration costs: a decode step, or ``draft_tokens`` draft steps and a verify step
        of ``draft_tokens + 1`` tokens per sequence."""
        step = self.forward(sequences, draft_tokens + 1, context)
        return step + self.draft(sequences, context) * draft_tokens if draft_tokens else step

    def prefill_chunk(self, chunk: int, context: int, mtp: bool) -> StepTime:
        """One prefill chunk of ``chunk`` tokens of one sequence on each lane (each data-parallel rank
        prefills its own sequence; tensor-parallel ranks share one) at mid-chunk ``context``; logits for the
        chunk's last token only; with MTP the draft layer prefills the chunk too."""
        t = self._timed("prefill", 1, chunk, context)
        return t + self._timed("draft", 1, chunk, context) if mtp else t

    @property
    def lanes(self) -> int:
        """Prefill chunks the pool runs at once."""
        return self.layout.world if self.layout.attn == "dp" else 1

    def _draft_kernels(self, per_rank: int, tokens: int, context: int) -> list[Kernel]:
        ks = self._kernels(per_rank, tokens, context, logits_rows=1,
                           select=lambda name: layer_of(name) in (self.mtp_layer, None))
        d, hc, rows = self.src.config.hidden_size, self.src.config.hc_mult, per_rank * tokens
        act = 2 * d  # bf16 bytes of one row
        # e_proj on the next token's embedding, h_proj on each hyper-connection stream (spec A.10), FP8
        proj = lambda name, n: Kernel(name, "linear", "dense_gemm", 2 * n * d * d, d * d + 2 * n * act, 1,  # noqa: E731
                                      "fp8", None)
        return ks + [proj("mtp.e_proj", rows), proj("mtp.h_proj", rows * hc)]


def _mtp_layer(cfg) -> int:
    """The layer the MTP block is costed as: it is a sliding-window layer with routed (not hashed) experts;
    the first sliding layer, else the first HCA layer (window plus few compressed rows), else layer 0."""
    for kind in ("sliding_attention", "heavily_compressed_attention"):
        for i, k in enumerate(cfg.layer_types):
            if k == kind:
                return i
    return 0
