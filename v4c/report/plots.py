"""The report's figures, drawn from a series dict with matplotlib's object API (no pyplot, so no
global backend is switched and nothing needs a display)."""
from __future__ import annotations

from pathlib import Path

from ..errors import V4CError
from .series import TERM_LABELS, context_label

TERM_COLORS = {"weights": "#4c72b0", "window": "#55a868", "sparse_core": "#8172b2",
               "indexer_scan": "#c44e52", "compressed_dense": "#dd8452"}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise V4CError("v4c report draws with matplotlib: pip install matplotlib "
                       "(in a v4c checkout: pip install -e \".[report]\")") from None


def _figure():
    require_matplotlib()
    from matplotlib.figure import Figure
    return Figure(figsize=(7.5, 4.5), dpi=110, layout="constrained")


def human_bytes(x: float, _pos=None) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.4g} B"


def _context_axis(ax, contexts):
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [context_label(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")


def kv_figure(series: dict):
    """KV-cache bytes of one sequence against context, model and V3.2-style baseline, log-log."""
    from matplotlib.ticker import FuncFormatter, LogLocator
    ctx, kv = series["contexts"], series["kv_bytes"]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(ctx, kv["model"], "o-", color="#c44e52", label=f"this model ({series['kv_cache_format']} rows, "
                                                          f"{series['indexer_cache_format']} indexer keys)")
    ax.plot(ctx, kv["baseline"], "s--", color="#4c72b0", label="V3.2-style cache of the same layer count")
    _context_axis(ax, ctx)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=4))
    ax.yaxis.set_major_formatter(FuncFormatter(human_bytes))
    ax.set_ylabel("KV cache per sequence")
    ratio = kv["model"][-1] / kv["baseline"][-1]
    ax.text(0.98, 0.04, f"at {context_label(ctx[-1])}: {human_bytes(kv['model'][-1])} against "
            f"{human_bytes(kv['baseline'][-1])}: {ratio:.1%} of a V3.2-style cache of the same "
            f"{series['model']['layers']} layers", transform=ax.transAxes,
            ha="right", fontsize=9)
    ax.set_title(f"KV cache per sequence ({series['model']['layers']} layers)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return fig


def flops_figure(series: dict):
    """Decode FLOPs of one token against context, stacked by term."""
    from matplotlib.ticker import FuncFormatter
    ctx, terms = series["contexts"], series["decode_flops"]["terms"]
    fig = _figure()
    ax = fig.add_subplot()
    x = list(range(len(ctx)))  # powers of two, evenly spaced like a log axis
    bottom = [0] * len(ctx)
    for t, values in terms.items():
        ax.bar(x, values, bottom=bottom, color=TERM_COLORS[t], label=TERM_LABELS[t], width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    for xi, total in zip(x, bottom):
        ax.annotate(f"{total / 1e9:.3g}", (xi, total), textcoords="offset points", xytext=(0, 2), ha="center",
                    fontsize=8)
    ax.set_xticks(x, [context_label(c) for c in ctx])
    ax.set_xlabel("context (tokens)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v / 1e9:g}"))
    ax.set_ylabel("GFLOP per decoded token")
    ax.set_title("Decode FLOPs per token by term")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return fig


PLOTS = {"kv_bytes.png": kv_figure, "decode_flops.png": flops_figure}


def write_plots(series: dict, out_dir: Path) -> dict[str, Path]:
    out = {}
    for name, draw in PLOTS.items():
        out[name] = Path(out_dir) / name
        draw(series).savefig(out[name], format="png", metadata={"Software": None})
    return out
