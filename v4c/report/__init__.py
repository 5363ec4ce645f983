"""``v4c report``: plots and a self-contained HTML page of what a model costs against context.

``write_report(model_or_artifact, out_dir)`` writes ``kv_bytes.png``, ``decode_flops.png``,
``report.html`` and ``series.json`` (the plotted numbers) into ``out_dir``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from ..artifact import has_manifest
from ..autotune.devices import DEVICES_BY_PRODUCT, device_for_target
from ..targets import TARGETS
from .page import render_page
from .pareto import load_plan, write_pareto, write_plan_report
from .plots import require_matplotlib, write_plots
from .series import CONTEXTS, build_series

DEFAULT_TARGET = "sm90"  # a model directory is compiled for this when no --target is given


def _compile_target(target: str | None) -> str:
    if target is None:
        return DEFAULT_TARGET
    if target in TARGETS:
        return target
    return DEVICES_BY_PRODUCT[target].arch  # a product key (h200-sxm): its architecture


def write_report(model, out_dir, *, target: str | None = None, batch: int = 1, context: int | None = None,
                 dtype: str = "bf16", contexts=CONTEXTS, plan=None,
                 log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Report on an artifact directory, or on a checkpoint / config directory compiled weight-free
    (``dtype``, ``target``) into a temporary artifact first. Returns the written files by name.
    ``plan``: a `v4c plan --sweep --json` output (dict or file) or ``GPU:N[:IN/OUT]`` to sweep the model
    now; its Pareto view joins the report. ``model`` may itself be such a JSON file: a report of the plan."""
    log = log or (lambda s: None)
    require_matplotlib()  # before a compile, not after it
    model = Path(model)
    if model.suffix == ".json" and model.is_file():
        return write_plan_report(load_plan(str(model)), out_dir)
    plan = load_plan(plan, model) if plan is not None else None
    if target is not None:
        device_for_target(target)  # an unknown target fails here, before any work
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if not model.exists():
        raise FileNotFoundError(f"{model}: no such artifact or model directory")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    with tempfile.TemporaryDirectory(prefix="v4c-report-") as tmp:
        if has_manifest(model):
            artifact = model
        else:
            from ..compiler import compile as compile_model
            artifact = compile_model(model, Path(tmp) / "artifact", target=_compile_target(target), dtype=dtype,
                                     weights="none", tuning_cache=False, aot=False)  # costs need no binaries
            log(f"compiled {model} weight-free for {_compile_target(target)} ({dtype})")
        series = build_series(artifact, target=target, batch=batch, context=context, contexts=contexts,
                              source=str(model))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_plots(series, out_dir)
    if plan is not None:
        series["plan"] = plan
        files.update(write_pareto(plan, out_dir))
    files["series.json"] = out_dir / "series.json"
    files["series.json"].write_text(json.dumps(series, indent=1) + "\n")
    files["report.html"] = out_dir / "report.html"
    files["report.html"].write_text(render_page(series, files))
    return files


__all__ = ["write_report", "build_series"]
