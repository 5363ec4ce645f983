"""What fraction of a GPU's datasheet ceilings each kind of kernel reaches, and what a launch and a
collective cost on top. One set of factors for every plan (never fitted to the rows it is checked on):
the defaults come from published kernel measurements; a GPU measured by ``benchmarks/gpu_check.py``
gets its own fractions for the families that run showed.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from .devices import GPU

FAMILIES = ("attention", "indexer", "grouped_gemm", "dense_gemm", "elementwise")

# kernel family of each op that launches; anything else (norms, mHC mixing, routing, embedding) is
# "elementwise", and the collectives are costed on the interconnect instead
FAMILY_OF_OP = {
    "sparse_attention": "attention", "attention": "attention",
    "indexer": "indexer", "indexer_topk": "indexer",
    "moe_ffn": "grouped_gemm", "moe_experts": "grouped_gemm",
    "linear": "dense_gemm", "grouped_linear": "dense_gemm", "q_proj": "dense_gemm", "kv_proj": "dense_gemm",
    "o_proj": "dense_gemm", "linear_rms_norm": "dense_gemm", "compressor": "dense_gemm", "compress": "dense_gemm",
}
COLLECTIVES = ("all_reduce", "ep_dispatch", "ep_combine")

# Fractions of the datasheet HBM bandwidth (memory-bound) and dense peak (compute-bound), from
# ../shared/docs/performance.md, sections 1 and 10 (all on the GPU named, against its datasheet):
DEFAULT_HBM = {
    "attention": 0.85,     # FlashMLA dense decode: 3,000 GB/s on H800 (90%), 2,826 GB/s on a community H100 (84%)
    "indexer": 0.80,       # memory-bound scans: SGLang's compressor reaches up to 80% of H200 HBM bandwidth
    "grouped_gemm": 0.62,  # DeepGEMM masked grouped GEMM at decode sizes: 2,064 GB/s on H800 (62%)
    "dense_gemm": 0.80,    # DeepGEMM small-M dense GEMM: up to 2,668 GB/s on H800 (80%)
    "elementwise": 0.60,   # torch.compile-generated Triton norms/softmax: ~2.0 TB/s on H100 (60%; QuACK 90%)
}
DEFAULT_COMPUTE = {
    "attention": 0.41,     # FlashMLA sparse FP8-KV decode: 410 TFLOP/s on H800 (41% of BF16)
    "indexer": 0.49,       # DeepGEMM fp8_mqa_logits: 960 TFLOP/s (49% of FP8, Hopper assumed)
    "grouped_gemm": 0.68,  # DeepGEMM contiguous grouped FP8 GEMM (prefill): 1,346 TFLOP/s on H800 (68%)
    "dense_gemm": 0.78,    # DeepGEMM FP8 dense GEMM: 1,550 TFLOP/s on H800 (78%)
    "elementwise": 0.50,   # rarely compute-bound; half of peak as a placeholder
}
# Grouped expert GEMMs with few rows per expert reach far less of HBM than DEFAULT_HBM's batched figure:
# DeepGEMM's Mega MoE takes 56 us per V4-Flash layer at batch 1 on EP8 (B200-class, dispatch and combine
# included), 16-22% of HBM, against 4,619 GB/s (58%) at 512 tokens per rank (performance.md section 10).
# In rows per expert (tokens x top-k / experts, Flash: 256 experts, top-6): one token on each of 8 ranks is
# 0.19 rows, 512 tokens on each is 96. The fraction runs from SMALL_M_HBM at the first (and below) to the
# family's fraction at the second (and above), linear in log(rows per expert) between: one curve from
# two published points of one kernel, never fitted to the rows the plan is checked on.
SMALL_M_HBM = 0.19
SMALL_M_ROWS = 8 * 6 / 256
FULL_M_ROWS = 512 * 8 * 6 / 256
# DeepEP V2 all-to-all on SM100 NVLink: 726-740 GB/s of 900 GB/s (81%); DeepEP V1 on H800 NVLink 153-158 of
# 160 GB/s (96-99%): the lower one, since V4 ranks also exchange over the NIC where wide EP leaves the domain
DEFAULT_LINK = 0.81
# Fixed cost of one collective, an assumption of the right order rather than a measurement: a one-shot
# NVLink exchange of a few kB takes single-digit microseconds, an RDMA exchange across nodes a few times
# that (DeepEP's low-latency kernels report tens of microseconds per dispatch with data included).
COLLECTIVE_LATENCY_S = {"nvlink": 5e-6, "network": 15e-6}
# Per kernel launch: 4-6 us of driver and runtime work per eager launch (pegainfer's launch-overhead
# measurements, RTX 5070 Ti); replayed from a CUDA graph the gap between kernels is ~0.5 us and a tiny
# kernel still takes ~2-3 us end to end (NVIDIA, "Getting Started with CUDA Graphs"): 2 us per launch.
LAUNCH_S = {"graphs": 2e-6, "eager": 5e-6}


@dataclass(frozen=True)
class Efficiency:
    hbm: dict = field(default_factory=lambda: dict(DEFAULT_HBM))
    compute: dict = field(default_factory=lambda: dict(DEFAULT_COMPUTE))
    link: float = DEFAULT_LINK
    collective_latency_s: dict = field(default_factory=lambda: dict(COLLECTIVE_LATENCY_S))
    launch_s: float = LAUNCH_S["graphs"]
    source: str = "published kernel measurements (defaults)"
    measured: tuple = ()  # "family/hbm", "family/compute" taken from a gpu_check run

    def grouped_hbm(self, rows_per_expert: float | None) -> float:
        """The grouped GEMM's HBM fraction at ``rows_per_expert`` (None: the batched fraction)."""
        full = self.hbm["grouped_gemm"]
        if rows_per_expert is None or rows_per_expert >= FULL_M_ROWS:
            return full
        low = min(SMALL_M_HBM, full)
        if rows_per_expert <= SMALL_M_ROWS:
            return low
        return low + (full - low) * math.log(rows_per_expert / SMALL_M_ROWS) / math.log(FULL_M_ROWS / SMALL_M_ROWS)

    def to_json(self) -> dict:
        return {"source": self.source, "measured": list(self.measured), "hbm": self.hbm, "compute": self.compute,
                "grouped_gemm_small_m": {"hbm": SMALL_M_HBM, "rows_per_expert": SMALL_M_ROWS,
                                         "full_at_rows_per_expert": FULL_M_ROWS},
                "link": self.link, "collective_latency_s": self.collective_latency_s, "launch_s": self.launch_s}


def results_dir() -> Path:
    """``benchmarks/results`` of a v4c checkout (absent in an installed package: then no measurements)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _matches(device_name: str, g: GPU) -> bool:
    # a whole word, so that H20 is not H200 and B200 is not GB200
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(g.key)}(?![A-Za-z0-9])", device_name, re.I) is not None


def _measured_run(g: GPU, directory: Path) -> tuple[Path, dict] | None:
    """The newest ``gpu_check_*.json`` run on this GPU (by its date, then name), if any."""
    runs = []
    for f in sorted(directory.glob("gpu_check_*.json")) if directory.is_dir() else ():
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # a broken file is no measurement
        if isinstance(data, dict) and _matches(str(data.get("device", "")), g) and data.get("results"):
            runs.append((str(data.get("date", "")), f.name, f, data))
    return (runs[-1][2], runs[-1][3]) if runs else None


def efficiency_for(g: GPU, cuda_graphs: bool = True, results: Path | None = None) -> Efficiency:
    """The defaults, with the fractions a gpu_check run on ``g`` measured (median per family and bound)."""
    base = Efficiency(launch_s=LAUNCH_S["graphs" if cuda_graphs else "eager"])
    found = _measured_run(g, results if results is not None else results_dir())
    if found is None:
        return base
    path, data = found
    samples: dict[tuple[str, str], list[float]] = {}
    for r in data["results"]:
        fam = FAMILY_OF_OP.get(r.get("op"), "elementwise")
        t, flops, nbytes = r.get("kernel_s"), r.get("flops") or 0, r.get("bytes") or 0
        if "error" in r or not t or t <= 0 or r.get("op") in COLLECTIVES:
            continue
        dtype = "bf16" if r.get("variant") == "bf16" or fam in ("attention", "elementwise") else "fp8"
        peak = g.peak(dtype)
        if nbytes / g.hbm >= flops / peak:  # memory-bound on the datasheet roofline
            samples.setdefault((fam, "hbm"), []).append(nbytes / t / g.hbm)
        else:
            samples.setdefault((fam, "compute"), []).append(flops / t / peak)
    hbm, compute = dict(base.hbm), dict(base.compute)
    for (fam, bound), xs in samples.items():
        (hbm if bound == "hbm" else compute)[fam] = min(1.0, statistics.median(xs))
    return replace(base, hbm=hbm, compute=compute, source=f"{path.name} ({data.get('device')}, {data.get('date')})",
                   measured=tuple(sorted(f"{f}/{b}" for f, b in samples)))
