"""What ``v4c inspect`` reports about an artifact (text table or JSON)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .artifact.manifest import verify_artifact
from .graph.text import parse_graph
from .model.config import V4Config

KIND_SHORT = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
              "heavily_compressed_attention": "hca"}


def inspect_artifact(path: str | Path) -> dict:
    man = verify_artifact(Path(path))
    cfg = V4Config.from_dict(json.loads((man.root / man.data["config"]).read_text()))
    graph = parse_graph((man.root / man.data["graph"]).read_text())
    total = sum(t.numel() for _, t in graph.params)
    embed = sum(t.numel() for n, t in graph.params if n == "model.embed_tokens.weight")
    schedule = [KIND_SHORT[k] for k in cfg.layer_types]
    return {
        "path": str(man.root),
        "format_version": man.data["format_version"],
        "target": man.data["target"],
        "dtype": man.data["dtype"],
        "toolchain": man.data["toolchain"],
        "weights_mode": man.weights_mode,
        "runnable": man.has_weights,
        "passes": man.data["passes"],
        "config": cfg.to_dict(),
        "schedule": schedule,
        "layers": dict(Counter(schedule)),
        "mlp_layers": dict(Counter(cfg.mlp_layer_types)),
        "params": total,
        "params_without_embedding": total - embed,
        "param_bytes": sum(t.nbytes() for _, t in graph.params),
        "nodes": len(graph.nodes),
        "ops": dict(sorted(Counter(graph.ops()).items())),
        "states": len(graph.states),
    }


def format_report(r: dict) -> str:
    c = r["config"]
    lines = [
        f"artifact   {r['path']}",
        f"format     v{r['format_version']}   target {r['target']}   dtype {r['dtype']}   "
        f"weights {r['weights_mode']}{'' if r['runnable'] else ' (inspect only)'}",
        f"toolchain  " + "  ".join(f"{k} {v}" for k, v in r["toolchain"].items()),
        f"model      hidden {c['hidden_size']}  layers {c['num_hidden_layers']}  heads {c['num_attention_heads']}x"
        f"{c['head_dim']}  experts {c['n_routed_experts']} top-{c['num_experts_per_tok']}  vocab {c['vocab_size']}",
        f"schedule   " + " ".join(r["schedule"]),
        f"layers     " + "  ".join(f"{k} {v}" for k, v in r["layers"].items())
        + "   mlp " + "  ".join(f"{k} {v}" for k, v in r["mlp_layers"].items()),
        f"params     {r['params'] / 1e9:.3f}B ({r['params_without_embedding'] / 1e9:.3f}B without the embedding), "
        f"{r['param_bytes'] / 2**30:.2f} GiB as compiled",
        f"graph      {r['nodes']} nodes, {r['states']} state buffers, passes: {', '.join(r['passes']) or 'none'}",
        "ops        " + ", ".join(f"{k} x{v}" for k, v in r["ops"].items()),
    ]
    return "\n".join(lines)
