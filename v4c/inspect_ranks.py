"""Per-rank numbers of a sharded artifact for ``v4c inspect``: weight bytes, KV-cache bytes of the rank's
sequences at a context, and the bytes each rank sends in the collectives of one decode step."""
from __future__ import annotations

from .graph.analysis import cache_footprint
from .graph.ops.collective import ASSIGNED
from .graph.registry import Concrete, get_op

COLLECTIVES = ("all_reduce", "ep_dispatch", "ep_combine")


def sequences_per_rank(batch: int, world: int, attn: str) -> list[int]:
    """attn=dp: the batch split into contiguous shares; attn=tp: every rank holds every sequence."""
    if attn == "tp":
        return [batch] * world
    return [batch // world + (r < batch % world) for r in range(world)]


def rank_report(man, context: int, batch: int) -> list[dict] | None:
    """``man``: the artifact (``v4c.artifact.Artifact``); None when it is not sharded."""
    par = man.parallel()
    if not par:
        return None
    topk = man.config()["num_experts_per_tok"]
    seqs = sequences_per_rank(batch, par["world_size"], par["attn"])
    out = []
    for r, (entry, b) in enumerate(zip(par["ranks"], seqs)):
        g = man.graph(rank=r)
        bind = {"B": b, "T": 1, "L": max(context, 1), ASSIGNED: b * topk}  # balanced routing
        types = g.value_types()
        sent, count = 0, 0
        for n in g.nodes:
            if n.op not in COLLECTIVES:
                continue
            conc = [Concrete(types[v].concrete(bind), types[v].dtype) for v in n.inputs]
            outs = [Concrete(types[v].concrete(bind), types[v].dtype) for v in n.outputs]
            sent += get_op(n.op).cost(conc, outs, n.attr, context).bytes
            count += 1
        weights = sum(t.nbytes() for _, t in g.params)
        kv = cache_footprint(g, context).total_bytes * b
        out.append({"rank": entry["rank"], "sequences": b, "weight_bytes": weights, "kv_bytes": kv,
                    "memory_bytes": weights + kv, "collectives_per_decode_step": count,
                    "collective_bytes_per_decode_step": sent})
    return out


def format_ranks(r: dict) -> list[str]:
    par, ranks = r["parallel"], r["ranks"]
    lines = [f"ranks      {par['world_size']} ({'ep=%d,attn=%s' % (par['ep'], par['attn'])}), batch {r['batch']} at "
             f"context {r['context']}",
             f"{'rank':>6}{'seqs':>6}{'weights GiB':>13}{'KV GiB':>10}{'total GiB':>11}{'coll/step':>11}{'MB sent/step':>14}"]
    for x in ranks:
        lines.append(f"{x['rank']:>6}{x['sequences']:>6}{x['weight_bytes'] / 2**30:>13.2f}{x['kv_bytes'] / 2**30:>10.2f}"
                     f"{x['memory_bytes'] / 2**30:>11.2f}{x['collectives_per_decode_step']:>11}"
                     f"{x['collective_bytes_per_decode_step'] / 1e6:>14.3f}")
    return lines
