"""The Pareto view of `v4c plan --sweep`: tokens/s per user against tokens/s per GPU, one line per serving
profile, the frontier marked, as the serving recipes' "pareto" plots draw it; and a report of a plan alone."""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import V4CError

PROFILE_STYLE = {"low-latency": ("#c44e52", "o"), "balanced": ("#4c72b0", "s"), "max-throughput": ("#55a868", "^")}


def load_plan(spec: str | dict, model=None) -> dict:
    """A `v4c plan --sweep --json` output: a dict, a JSON file, or ``GPU:N[:IN/OUT]`` to sweep ``model`` now
    (8192 / 1024 tokens unless given)."""
    if isinstance(spec, dict):
        plan = spec
    elif Path(spec).is_file():
        try:
            plan = json.loads(Path(spec).read_text())
        except ValueError as e:
            raise V4CError(f"{spec}: not a JSON file ({e})") from None
    else:
        parts = spec.split(":")
        try:
            gpu, gpus = parts[0], int(parts[1])
            io = [int(x) for x in parts[2].split("/")] if len(parts) > 2 else [8192, 1024]
            if len(parts) > 3 or len(io) != 2:
                raise ValueError
        except (IndexError, ValueError):
            raise ValueError(f"--plan {spec!r}: a `v4c plan --sweep --json` file, or GPU:N[:IN/OUT] such as "
                             f"b200:4 or b200:4:8192/1024") from None
        if model is None:
            raise ValueError("--plan GPU:N needs a model to plan")
        from ..plan import make_plan
        plan = make_plan(model, gpu=gpu, gpus=gpus, input_len=io[0], output_len=io[1], sweep=True)
    if not isinstance(plan, dict) or not plan.get("sweep"):
        raise V4CError("the plan has no sweep: make it with `v4c plan ... --sweep --json`")
    return plan


def _title(plan: dict) -> str:
    w = plan["workload"]
    pool = f"{plan['gpus']} x {plan['gpu']['key'].upper()}" + (" + prefill pool" if plan.get("disaggregated") else "")
    return f"{Path(plan['model']).name}: {pool}, {w['input_len']} in / {w['output_len']} out"


def pareto_figure(plan: dict):
    from .plots import _figure
    fig = _figure()
    ax = fig.add_subplot()
    points = plan["sweep"]
    for profile in dict.fromkeys(p["profile"] for p in points):
        pts = sorted((p for p in points if p["profile"] == profile), key=lambda p: p["concurrency"])
        color, marker = PROFILE_STYLE.get(profile, ("#8172b2", "d"))
        ax.plot([p["tokens_per_s_per_user"] for p in pts], [p["tokens_per_s_per_gpu"] for p in pts], marker + "-",
                color=color, label=profile, alpha=0.85)
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["tokens_per_s_per_user"])
    ax.plot([p["tokens_per_s_per_user"] for p in front], [p["tokens_per_s_per_gpu"] for p in front], "--",
            color="#222", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (1 / time per output token)")
    ax.set_ylabel("tokens/s per GPU (input + output)")
    ax.set_title(_title(plan), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def write_pareto(plan: dict, out_dir: Path) -> dict[str, Path]:
    path = Path(out_dir) / "pareto.png"
    pareto_figure(plan).savefig(path, format="png", metadata={"Software": None})
    return {"pareto.png": path}


def pareto_section(plan: dict | None, plots: dict) -> str:
    """The page's Pareto section (empty without a plan)."""
    if not plan:
        return ""
    from .page import _img, _table
    rows = [(p["profile"], p["concurrency"], (f"{p['replicas']} x " if p.get("replicas", 1) > 1 else "")
             + (p["parallel"] or "1 GPU"), p["draft_tokens"],
             f"{p['tokens_per_s_per_user']:.1f}", f"{p['tokens_per_s_per_gpu']:,.0f}", f"{p['ttft_ms']:.0f}",
             f"{p['tpot_ms']:.2f}", "yes" if p["pareto"] else "")
            for p in plan["sweep"]]
    eff = plan.get("efficiency", {}).get("source", "")
    return f"""
<h2>Serving: tokens/s per user against tokens/s per GPU</h2>
{_img(plots['pareto.png'], 'Pareto view of the plan sweep')}
<p class="note">{html.escape(_title(plan))}. Predicted by <code>v4c plan --sweep</code> from the compiled model's
kernels (roofline with efficiency factors: {html.escape(eff)}), each profile at its chosen layout and MTP depth.</p>
{_table(('profile', 'concurrency', 'layout', 'MTP', 'tok/s per user', 'tok/s per GPU', 'TTFT ms', 'TPOT ms',
         'frontier'), rows, 'pareto')}
"""


def write_plan_report(plan: dict, out_dir: Path) -> dict[str, Path]:
    """A report of a plan alone: the Pareto figure, its page and the plan's JSON."""
    from .page import _STYLE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_pareto(plan, out_dir)
    files["plan.json"] = out_dir / "plan.json"
    files["plan.json"].write_text(json.dumps(plan, indent=1) + "\n")
    files["report.html"] = out_dir / "report.html"
    files["report.html"].write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>v4c plan: {html.escape(_title(plan))}</title>
<style>{_STYLE}</style></head><body>
<h1>v4c plan</h1>
{pareto_section(plan, files)}
</body></html>
""")
    return files
