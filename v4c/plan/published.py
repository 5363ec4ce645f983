"""Published V4 serving measurements and v4c plan's predictions for the same setups, with the ratio
predicted / measured. One set of efficiency factors for every row (the defaults of ``efficiency``); a
row's recipe (layout, MTP depth, acceptance) is given to the plan as the measurement ran it, and the
plan's own choice for the recipe's profile is reported beside it.

    python -m v4c.plan.published            # the README table (a few minutes: the NVL72 rows sweep)
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..model.presets import FLASH_HUB_CONFIG, PRO_HUB_CONFIG
from .choose import candidate_specs
from .devices import gpu as gpu_named
from .efficiency import efficiency_for
from .plan import make_plan
from .serving import Workload
from .source import load_model
from .sweep import at_user_speed, pareto, sweep

# sgl-project/sglang, docs_new/src/snippets/configs/deepseek-ai/deepseek-v4-benchmarks.jsx (sglang 0.5.15,
# random 8K in / 1K out; tokens/s per GPU counts input + output) and deepseek-v4.jsx (the recipes' flags)
SGLANG = "SGLang cookbook, V4-Flash FP4 on 4 x B200"
SGLANG_PRO = "SGLang cookbook, V4-Pro FP4 on 8 x B200"
# SemiAnalysis InferenceX, "GB300 NVL72 vs GB200 NVL72 ... on DeepSeek-V4-Pro" (2026-05-26): Dynamo + vLLM,
# disaggregated prefill / decode, wide EP, no speculative decoding; tokens/s per GPU interpolated along
# each rack's Pareto frontier at 27 tokens/s per user
INFERENCEX = "InferenceX, V4-Pro FP4, disaggregated wide EP"


@dataclass(frozen=True)
class Row:
    source: str
    label: str
    preset: str
    gpu: str
    gpus: int
    profile: str
    measured: dict
    concurrency: int | None = None
    # parallel, draft_tokens (0: no MTP), accept_length, chunk (--chunked-prefill-size) as the measurement ran
    recipe: dict = field(default_factory=dict)
    user_speed: float | None = None  # InferenceX: read the frontier at this many tokens/s per user


# the cookbook's B200 FP4 recipes (deepseek-v4.jsx): source, model, GPUs, the plan's profile, the recipe. The
# balanced recipe's acceptance at 1 draft token and Pro's at 3 are not published: the plan's default (1 + p ...).
# None of the recipes sets --max-running-requests: SGLang then admits 256 requests at once for V4
# (python/sglang/srt/arg_groups/deepseek_v4_hook.py, apply_deepseek_v4_defaults), 256 // dp per rank
SGLANG_V4_MAX_RUNNING = 256
_B200 = {
    ("flash", "low-latency"): (SGLANG, "v4-flash", 4, "low-latency",
                               {"parallel": "ep=4,attn=tp", "draft_tokens": 3, "accept_length": 2.5}),
    ("flash", "balanced"): (SGLANG, "v4-flash", 4, "balanced", {"parallel": "ep=4,attn=dp", "draft_tokens": 1}),
    ("flash", "high-throughput"): (SGLANG, "v4-flash", 4, "max-throughput",
                                   {"parallel": "ep=4,attn=dp", "draft_tokens": 0}),
    # TP 8, MTP 3 steps / 4 draft tokens, 8,192-token prefill chunks
    ("pro", "low-latency"): (SGLANG_PRO, "v4-pro", 8, "low-latency",
                             {"parallel": "ep=8,attn=tp", "draft_tokens": 3, "chunk": 8192}),
}


def _cell(variant: str, strategy: str, concurrency: int, ttft_ms, tpot_ms, tokens_per_s_per_gpu) -> Row:
    """One measured cell of the cookbook (deepseek-v4-benchmarks.jsx) with its recipe."""
    source, preset, gpus, profile, recipe = _B200[variant, strategy]
    return Row(source, f"{strategy}, concurrency {concurrency}", preset, "b200", gpus, profile,
               {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "tokens_per_s_per_gpu": tokens_per_s_per_gpu}, concurrency,
               recipe)


ROWS = (
    _cell("flash", "low-latency", 1, 227, 2.88, 575),
    _cell("flash", "low-latency", 16, 248, 5.44, 4767),
    _cell("flash", "balanced", 64, 1477, 41.54, 3229),
    _cell("flash", "balanced", 256, 2874, 66.2, 8401),
    _cell("flash", "high-throughput", 1024, 104331, 71.27, 7997),
    _cell("pro", "low-latency", 1, 333, 4.26, 214),
    _cell("pro", "low-latency", 16, 405, 9.95, 1259),
    Row(INFERENCEX, "GB300 NVL72 at 27 tok/s/user", "v4-pro", "gb300", 72, "max-throughput",
        {"tokens_per_s_per_gpu": 6182}, recipe={"attn": "dp"}, user_speed=27),
    Row(INFERENCEX, "GB200 NVL72 at 27 tok/s/user", "v4-pro", "gb200", 72, "max-throughput",
        {"tokens_per_s_per_gpu": 2189}, recipe={"attn": "dp"}, user_speed=27),
)
DECODE_POOLS = (8, 16, 32)  # decode pool sizes the NVL72 frontier is swept over (InferenceX ran 8-68)
IO = (8192, 1024)


def _model_dir(preset: str, root: Path) -> Path:
    d = root / preset
    if not d.is_dir():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"v4-flash": FLASH_HUB_CONFIG, "v4-pro": PRO_HUB_CONFIG}[preset]))
    return d


def _recipe_row(row: Row, model: Path) -> dict:
    r = row.recipe
    mtp = r["draft_tokens"] > 0
    engine = {"chunk_tokens": r["chunk"]} if "chunk" in r else {}
    engine["max_running"] = SGLANG_V4_MAX_RUNNING  # the engine's, for the recipe and the plan's own choice alike
    given = make_plan(model, gpu=row.gpu, gpus=row.gpus, input_len=IO[0], output_len=IO[1],
                      concurrency=row.concurrency, profile=row.profile, parallel=r["parallel"],
                      speculative="mtp" if mtp else "none", draft_tokens=r["draft_tokens"] if mtp else None,
                      accept_length=r.get("accept_length"), **engine)
    own = make_plan(model, gpu=row.gpu, gpus=row.gpus, input_len=IO[0], output_len=IO[1],
                    concurrency=row.concurrency, profile=row.profile, **engine)
    predicted = {k: given[k] for k in row.measured}
    return {"predicted": predicted, "recipe": f"{r['parallel']}, MTP {r['draft_tokens']}",
            "plan_choice": (f"{own['layout']['replicas']} x " if own["layout"]["replicas"] > 1 else "")
                           + f"{own['layout']['parallel'] or '1 GPU'}, MTP {own['speculative']['draft_tokens']}"}


def _frontier_row(row: Row, model: Path) -> dict:
    g = gpu_named(row.gpu)
    eff = efficiency_for(g)
    src = load_model(model, g)
    w = Workload(*IO)
    points = []
    for n in DECODE_POOLS:
        points += sweep(src, g, eff, w, gpus=n, parallel=f"ep={n},attn={row.recipe['attn']}",
                        specs=candidate_specs("none", None, None), disagg=True, max_gpus=row.gpus,
                        profiles=("max-throughput",))
    points = pareto(points)
    at = at_user_speed(points, row.user_speed)
    near = min((p for p in points if p["pareto"]), key=lambda p: abs(p["tokens_per_s_per_user"] - row.user_speed))
    return {"predicted": {"tokens_per_s_per_gpu": at}, "recipe": "disaggregated, wide EP, no MTP",
            "plan_choice": f"decode {near['gpus'] - near['prefill_gpus']} GPUs {near['parallel']}, prefill "
                           f"{near['prefill_gpus']} GPUs, concurrency {near['concurrency']}",
            "frontier": [p for p in points if p["pareto"]]}


def compare(rows=ROWS, root: Path | None = None) -> list[dict]:
    """Each row's measured and predicted numbers, ratio = predicted / measured per metric."""
    with tempfile.TemporaryDirectory(prefix="v4c-published-") as tmp:
        root = root or Path(tmp)
        out = []
        for row in rows:
            model = _model_dir(row.preset, root)
            got = _frontier_row(row, model) if row.user_speed else _recipe_row(row, model)
            got["ratio"] = {k: (got["predicted"][k] / v if got["predicted"][k] is not None else None)
                            for k, v in row.measured.items()}
            out.append({"source": row.source, "label": row.label, "measured": row.measured, **got})
        return out


_NAMES = {"ttft_ms": "TTFT ms", "tpot_ms": "ms per output token", "tokens_per_s_per_gpu": "tokens/s per GPU"}


def markdown(results: list[dict]) -> str:
    lines = ["| source | setup | metric | measured | predicted | predicted / measured | recipe | plan's choice |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for k, v in r["measured"].items():
            p, q = r["predicted"][k], r["ratio"][k]
            lines.append(f"| {r['source']} | {r['label']} | {_NAMES[k]} | {v:,} | "
                         f"{'-' if p is None else format(p, ',.0f' if p >= 100 else '.2f')} | "
                         f"{'-' if q is None else format(q, '.2f')} | {r['recipe']} | {r['plan_choice']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    res = compare()
    print(markdown(res))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(res, indent=1) + "\n")
