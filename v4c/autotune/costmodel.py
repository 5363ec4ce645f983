"""An analytic cost model: predicted seconds of one kernel launch for a meta choice.

It ranks candidates before (or instead of) measuring them; it is deterministic and needs no
GPU.  Inputs: the op's ``Cost`` (FLOPs and minimal HBM bytes, from the op registry), the meta
choice, the problem ``shapes`` (``M``, ``N``, ``K``; ``G`` groups/batch; ``elem_bytes`` or
``dtype``, see ``space.elem_bytes_of``), the ``DeviceSpec`` and the compute dtype.

The formula (every term is also returned by ``explain``)::

    threads   = 32 * num_warps                                   (num_warps defaults to 4)
    tiles     = G * ceil(M / BLOCK_M) * ceil(N / BLOCK_N)        a missing M/N or BLOCK_* -> 1
    pad_eff   = G*M*N / (tiles * BLOCK_M * BLOCK_N)              work wasted on padded rows/cols
    tc_eff    = min(1, BLOCK_M/64) * sqrt(min(1, BLOCK_N/64))    small-tile tensor-core penalty
    regs      = 32 + ceil(BLOCK_M*BLOCK_N / threads)             fp32 accumulators per thread
    reg_cap   = min(255, regs_per_sm // threads)                 what the compiler may allocate
    spill     = max(1, regs / reg_cap)                           register spilling slows the block
    smem      = space.smem_bytes(meta, elem_bytes)
    occupancy = min(max_warps_per_sm // num_warps,               blocks resident per SM
                    regs_per_sm // (min(regs, reg_cap) * threads),
                    smem_per_sm // (smem + 1 KiB),               (the driver reserves 1 KiB a block)
                    max_blocks_per_sm)
    waves     = ceil(tiles / sm_count)
    wave_eff  = tiles / (waves * sm_count)                       wave quantisation
    resident  = min(tiles, sm_count * occupancy)                 blocks running at once
    issue_eff = min(1, num_warps * min(occupancy, ceil(tiles/sm_count)) / 8)
                                                                 warps per SM to keep 4 tensor
                                                                 sub-cores busy (2 each)
    in_flight = resident * stage_bytes * max(1, num_stages - 1)
    mem_eff   = min(1, in_flight / (hbm_bw * 700 ns))            Little's law: bytes in flight
                                                                 needed to cover DRAM latency
    t_compute = flops / (peak(dtype) * tc_eff * pad_eff * issue_eff)
    t_memory  = bytes / (hbm_bw * mem_eff)
    t_l2      = tiles * K * (BLOCK_M + BLOCK_N) * elem_bytes / (4 * hbm_bw)
                                                                 operand tiles re-streamed from L2;
                                                                 small tiles re-read more
    t_sm      = max(t_compute, t_l2) / wave_eff                  per-SM work: quantised in waves
    t_body    = max(t_sm, t_memory)         (t_compute/wave_eff + max(t_memory, t_l2/wave_eff)
                                             when num_stages == 1: nothing overlaps loads with math)
    seconds   = 3 us launch + t_body * spill

``stage_bytes = (BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * elem_bytes``; ops without such tiles
get ``mem_eff = 1`` and no L2 term (``t_l2`` needs ``K`` and a ``BLOCK_M`` or ``BLOCK_N``).
The L2 bandwidth is not a datasheet number: the model assumes 4x HBM bandwidth
(``L2_BW_OVER_HBM``), the order microbenchmarks report for A100/H100.  Likewise the 700 ns
DRAM latency and the 8 warps per SM are modelling constants, not facts of a product.  A
choice that cannot run on the device (too much shared memory, no warps or more than 1024
threads, zero occupancy) costs ``math.inf``.

Wave quantisation counts SMs, not ``sm_count * occupancy`` slots: blocks resident on one SM
share its throughput, so 132 tiles on 132 SMs run in one round whether 1 or 2 blocks fit per SM
(counting slots would make a config *slower* for needing less shared memory).  With one block
per SM the two formulas agree; occupancy enters through latency hiding (``mem_eff``).  It
divides the per-SM terms (tensor-core math, L2 streaming) but not the HBM term: HBM is shared,
and how little of it a small grid can use is already what ``mem_eff`` counts (dividing both
would charge a 4-tile grid twice).
``peak(dtype)`` falls back to the next wider format where the tensor cores lack ``dtype``
(``DeviceSpec.peak_tflops``).
"""
from __future__ import annotations

import math
from typing import Iterable

from ..graph.registry import Cost
from .devices import DeviceSpec
from .space import MAX_THREADS_PER_BLOCK, WARP, _entries, elem_bytes_of, smem_bytes

LAUNCH_S = 3e-6
L2_BW_OVER_HBM = 4.0
WARPS_FOR_FULL_ISSUE = 8
DRAM_LATENCY_S = 700e-9
TC_TILE = 64
BASE_REGS = 32
MAX_REGS_PER_THREAD = 255
SMEM_RESERVED_PER_BLOCK = 1024
DEFAULT_WARPS = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def explain(op_cost: Cost, meta: dict, shapes: dict, device: DeviceSpec, dtype: str,
            measured: dict | None = None) -> dict:
    """Every term of the formula in the module docstring, plus ``seconds``, ``runnable`` and
    ``reason`` (None, or why the choice cannot run; a block with no warps or over 1024 threads
    gets only those three keys). ``measured``: the compiler's ``registers`` and ``shared_bytes``
    for this choice (``v4c/aot``), used instead of the estimates."""
    shapes = _entries(shapes)
    bm, bn, bk = meta.get("BLOCK_M"), meta.get("BLOCK_N"), meta.get("BLOCK_K")
    warps = meta.get("num_warps", DEFAULT_WARPS)
    stages = meta.get("num_stages")
    threads = warps * WARP
    eb = elem_bytes_of(shapes, dtype)

    groups = int(shapes.get("G", 1))
    tiles, useful, padded = groups, groups, groups
    for dim, blk in ((shapes.get("M"), bm), (shapes.get("N"), bn)):
        if dim is not None and blk is not None:
            n = _ceil_div(int(dim), int(blk))
            tiles *= n
            useful *= int(dim)
            padded *= n * int(blk)
    pad_eff = useful / padded if padded else 1.0

    tc_eff = 1.0
    if bm is not None:
        tc_eff *= min(1.0, bm / TC_TILE)
    if bn is not None:
        tc_eff *= math.sqrt(min(1.0, bn / TC_TILE))

    if warps < 1 or threads > MAX_THREADS_PER_BLOCK:
        return dict(seconds=math.inf, runnable=False,
                    reason=f"num_warps={warps}: a block needs 1 to {MAX_THREADS_PER_BLOCK // WARP} warps")
    acc = _ceil_div(bm * bn, threads) if bm is not None and bn is not None else 0
    regs = _ceil_div(BASE_REGS + acc, 8) * 8
    if measured and measured.get("registers"):
        regs = int(measured["registers"])
    # the compiler caps registers so that one block fits the register file; the rest spills
    reg_cap = min(MAX_REGS_PER_THREAD, device.regs_per_sm // threads // 8 * 8)
    spill = max(1.0, regs / reg_cap)

    smem = smem_bytes(meta, eb) if not measured or measured.get("shared_bytes") is None \
        else int(measured["shared_bytes"])
    limits = [device.max_warps_per_sm // warps, device.regs_per_sm // (min(regs, reg_cap) * threads),
              device.max_blocks_per_sm]
    if smem:
        limits.append(device.smem_per_sm // (smem + SMEM_RESERVED_PER_BLOCK))
    occupancy = min(limits)
    reason = None
    if smem > device.smem_per_block:
        reason = f"shared memory {smem} B > {device.smem_per_block} B per block"
    elif occupancy < 1:
        reason = "no block fits on an SM"
    runnable = reason is None

    waves = _ceil_div(tiles, device.sm_count)
    wave_eff = tiles / (waves * device.sm_count)

    occ = max(occupancy, 1)
    resident = min(tiles, device.sm_count * occ)
    issue_eff = min(1.0, warps * min(occ, _ceil_div(tiles, device.sm_count)) / WARPS_FOR_FULL_ISSUE)

    bw = device.hbm_gbs * 1e9
    stage_bytes = 0.0
    if bk is not None:
        stage_bytes = ((bm or 0) * bk + bk * (bn or 0)) * eb
    if stage_bytes > 0:
        in_flight = resident * stage_bytes * max(1, (stages or 1) - 1)
        mem_eff = min(1.0, in_flight / (bw * DRAM_LATENCY_S))
    else:
        mem_eff = 1.0

    peak = device.peak_tflops(dtype) * 1e12
    t_compute = op_cost.flops / (peak * tc_eff * pad_eff * issue_eff) if op_cost.flops else 0.0
    t_memory = op_cost.bytes / (bw * mem_eff) if op_cost.bytes else 0.0
    k = shapes.get("K")
    t_l2 = 0.0
    if k is not None and (bm is not None or bn is not None):
        t_l2 = tiles * int(k) * ((bm or 0) + (bn or 0)) * eb / (L2_BW_OVER_HBM * bw)
    overlapped = stages is None or stages > 1
    if overlapped:
        t_body = max(max(t_compute, t_l2) / wave_eff, t_memory)
    else:
        t_body = t_compute / wave_eff + max(t_memory, t_l2 / wave_eff)
    seconds = LAUNCH_S + t_body * spill if runnable else math.inf
    return dict(seconds=seconds, t_compute=t_compute, t_memory=t_memory, t_l2=t_l2, tiles=tiles, waves=waves,
                wave_eff=wave_eff, pad_eff=pad_eff, tc_eff=tc_eff, issue_eff=issue_eff, mem_eff=mem_eff,
                regs=regs, spill=spill, smem=smem, occupancy=occupancy, resident=resident, runnable=runnable,
                reason=reason, elem_bytes=eb)


def predict(op_cost: Cost, meta: dict, shapes: dict, device: DeviceSpec, dtype: str,
            measured: dict | None = None) -> float:
    """Predicted seconds of one launch (``math.inf`` where the choice cannot run); see the
    module docstring for the formula."""
    return explain(op_cost, meta, shapes, device, dtype, measured)["seconds"]


def rank(candidates: Iterable[dict], op_cost: Cost, shapes: dict, device: DeviceSpec,
         dtype: str) -> list[tuple[dict, float]]:
    """``(meta, predicted seconds)`` fastest first; ties keep the candidates' order."""
    scored = [(meta, predict(op_cost, meta, shapes, device, dtype)) for meta in candidates]
    return sorted(scored, key=lambda ms: ms[1])
