"""What ``v4c inspect`` says about an artifact's MTP block: its own params, its states (its sliding
window) and what one draft step (a T = 1 call of the block) costs, from the same analyses as the main
graph's decode step."""
from __future__ import annotations

from collections import Counter

from .graph.analysis import cache_footprint, decode_step_kernels, state_kind


def mtp_report(man, main_graph, context: int, batch: int) -> dict:
    text = man.mtp_graph_text()
    if text is None:
        return {"compiled": False, "note": man.mtp_note}
    from .graph.text import parse_graph
    g = parse_graph(text)
    shared = dict(main_graph.params)
    own = [(n, t) for n, t in g.params if n not in shared]  # the embedding and LM head are the main model's
    kernels = decode_step_kernels(g, context, batch)
    cache = cache_footprint(g, context)
    return {
        "compiled": True,
        "note": man.mtp_note,
        "nodes": len(g.nodes),
        "ops": dict(sorted(Counter(g.ops()).items())),
        "params": sum(t.numel() for _, t in own if t.dtype != "e8m0"),
        "param_bytes": sum(t.nbytes() for _, t in own),
        "shared_params": sorted(n for n, _ in g.params if n in shared),
        "states": [{"name": n, "kind": state_kind(g, n), "shape": [str(d) for d in t.shape], "dtype": t.dtype}
                   for n, t in g.states],
        "kv_cache": {"total_bytes": cache.total_bytes, "by_kind": cache.by_kind},
        "kernels": [{"name": k.name, "op": k.op, "flops": k.flops, "bytes": k.bytes, "launches": k.launches}
                    for k in kernels],
        "launches_per_draft_step": sum(k.launches for k in kernels),
        "flops_per_draft_token": sum(k.flops for k in kernels) // batch,
        "bytes_per_draft_step": sum(k.bytes for k in kernels),
    }


def format_mtp(r: dict) -> list[str]:
    m = r.get("mtp")
    if not m:
        return []
    if not m["compiled"]:
        return [f"mtp        none ({m.get('note') or 'compiled by an older v4c'})"]
    states = ", ".join(f"{s['name']} {s['kind']} [{','.join(s['shape'])}] {s['dtype']}" for s in m["states"])
    return [f"mtp        {m['params'] / 1e9:.3f}B params of its own ({m['param_bytes'] / 2**30:.2f} GiB; shares "
            f"{', '.join(m['shared_params'])}), {m['nodes']} nodes",
            f"mtp state  {states}: {m['kv_cache']['total_bytes'] / 2**20:.2f} MiB per sequence",
            f"mtp draft  {m['launches_per_draft_step']} launches, {m['flops_per_draft_token'] / 1e9:.3f} GFLOP/token, "
            f"{m['bytes_per_draft_step'] / 1e9:.3f} GB moved per draft step (batch {r['batch']})"]
