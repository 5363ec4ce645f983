"""The report's self-contained HTML page: the figures as base64 data URIs, the numbers as tables."""
from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path

from .plots import human_bytes
from .series import TERM_LABELS, context_label

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3} img{max-width:100%} .note{color:#555;font-size:.9rem}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(head, rows, cls="") -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def render_page(series: dict, plots: dict[str, Path]) -> str:
    from .pareto import pareto_section  # it draws on this module's helpers
    ctx, kv, fl, kt, m = (series["contexts"], series["kv_bytes"], series["decode_flops"], series["kernels"],
                          series["model"])
    kv_rows = [(context_label(c), human_bytes(a), human_bytes(b), f"{a / b:.1%}")
               for c, a, b in zip(ctx, kv["model"], kv["baseline"])]
    terms = list(fl["terms"])
    fl_rows = [(context_label(c), *(f"{fl['terms'][t][i] / 1e9:.3f}" for t in terms), f"{fl['total'][i] / 1e9:.3f}")
               for i, c in enumerate(ctx)]
    by_op = defaultdict(lambda: [0, 0, 0, 0, 0.0])
    for r in kt["rows"]:
        a = by_op[r["op"]]
        a[0] += 1
        a[1] += r["launches"]
        a[2] += r["flops"]
        a[3] += r["bytes"]
        a[4] += r["roofline_s"]
    op_rows = [(op, n, la, f"{f / 1e9:.4f}", f"{b / 1e6:.3f}", _us(t), f"{t / kt['roofline_s']:.1%}")
               for op, (n, la, f, b, t) in sorted(by_op.items(), key=lambda x: -x[1][4])]
    kinds = ", ".join(f"{n} {k}" for k, n in m["layer_kinds"].items())
    k_rows = [(r["name"], r["op"], r["flops"], r["bytes"], r["launches"], _us(r["roofline_s"]), r["bound"])
              for r in kt["rows"]]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>v4c report: {_e(series['source'])}</title>
<style>{_STYLE}</style></head><body>
<h1>v4c report</h1>
<p>{_e(series['source'])}: {m['layers']} layers ({_e(kinds)}), hidden {m['hidden_size']},
{m['params'] / 1e9:.3f}B parameters, activations {_e(series['dtype'])}, KV rows {_e(series['kv_cache_format'])},
indexer keys {_e(series['indexer_cache_format'])}, maximum context {context_label(m['max_context'])}.</p>

<h2>KV cache per sequence</h2>
{_img(plots['kv_bytes.png'], 'KV cache bytes per sequence against context')}
<p class="note">This model: {kv['model_bytes_per_token']:.1f} B per token of growth plus fixed window rings and
compressor state ({human_bytes(kv['model_fixed'][0])}). Baseline: {_e(kv['baseline_desc'])},
{kv['baseline_bytes_per_token']} B per token.</p>
{_table(('context', 'this model', 'V3.2-style cache, same layers', 'ratio'), kv_rows)}

<h2>Decode FLOPs per token</h2>
{_img(plots['decode_flops.png'], 'Decode FLOPs per token against context, by term')}
<p class="note">One sequence, one new token. "weights" is everything that does not grow with the context
(weight GEMMs and the per-token norms, RoPE, mHC mixing and routing); the other terms are attention over the
window, the CSA top-k rows (sparse core), the CSA indexer's scan of every compressed key, and HCA's dense
attention over all compressed rows.</p>
{_table(('context', *(TERM_LABELS[t] + ' GFLOP' for t in terms), 'total GFLOP'), fl_rows)}

<h2>Kernels of one decode step on {_e(kt['target'])}</h2>
<p>{_e(kt['device'])}: {kt['peak_tflops']:g} TFLOP/s ({_e(kt['compute_dtype'])}), {kt['hbm_gbs']:g} GB/s.
Batch {kt['batch']}, context {context_label(kt['context'])}: {len(kt['rows'])} kernels, {kt['launches']} launches,
roofline time {_us(kt['roofline_s'])} us per step (each kernel at max(FLOPs / peak, bytes / bandwidth);
launch overheads and on-chip limits not included).</p>
{_table(('op', 'kernels', 'launches', 'GFLOP', 'MB', 'roofline us', 'share'), op_rows, 'ops')}
<details><summary>Every kernel ({len(k_rows)})</summary>
{_table(('kernel', 'op', 'FLOPs', 'bytes', 'launches', 'roofline us', 'bound'), k_rows, 'kernels')}
</details>
<p class="note">Numbers from the same accounting as <code>v4c inspect --json --context N</code>;
the data are in series.json next to this page.</p>
{pareto_section(series.get("plan"), plots)}
</body></html>
"""
