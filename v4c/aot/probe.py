"""``python -m v4c.aot.probe``: compile one model's kernel launches for a GPU target and print what each
config uses (a developer's tool for fitting kernels to real targets; ``v4c compile`` runs the same).

    python -m v4c.aot.probe v4-flash --target sm90 --ops sparse_attention --buckets B=1,T=1
    python -m v4c.aot.probe path/to/config-dir --target sm80 --ops moe_ffn --meta '{"BLOCK_M": 16}'

MODEL is a config (or checkpoint) directory or a preset: v4-flash, v4-pro, tiny. Every candidate tried is
listed with its verdict; ``--meta`` tries exactly that meta (over the template default) and nothing else.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _model_dir(model: str, tmp: Path) -> Path:
    from ..model import presets
    known = {"v4-flash": presets.FLASH_HUB_CONFIG, "v4-pro": presets.PRO_HUB_CONFIG, "tiny": presets.tiny_config_dict()}
    if model in known:
        d = tmp / model
        d.mkdir()
        (d / "config.json").write_text(json.dumps(known[model]))
        return d
    return Path(model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4c.aot.probe", description=__doc__.splitlines()[0])
    p.add_argument("model", help="config or checkpoint directory, or v4-flash / v4-pro / tiny")
    p.add_argument("--target", required=True)
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--ops", default=None, help="comma-separated IR ops (default: all with kernels)")
    p.add_argument("--buckets", default=None, help="comma-separated 'B=..,T=..' pairs joined by ';' (default: all)")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--meta", default=None, help="JSON meta to try instead of the candidate list")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    from ..artifact.shapes import default_buckets, parse_bucket
    from ..autotune.choose import choose_configs
    from ..codegen.emit import emit
    from ..model.build import build_graph
    from ..model.config import V4Config
    from ..model.weight_quant import quantized_graph
    from ..passes import PassManager, default_pipeline
    from ..passes.pipeline import resolve_cache_formats
    from .build import Options, compile_ahead

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        d = _model_dir(a.model, tmp)
        cfg = V4Config.from_json_file(d / "config.json")
        graph = quantized_graph(build_graph(cfg, a.dtype), d / "config.json", None)
        kv, ix = resolve_cache_formats(cfg, a.dtype, "auto", "auto")
        graph = PassManager(default_pipeline(True, kv, ix)).run(graph)
        buckets = [parse_bucket(b) for b in a.buckets.split(";")] if a.buckets else default_buckets()
        ctx = a.context or cfg.max_position_embeddings
        em = emit(graph, a.target)
        ops = set(a.ops.split(",")) if a.ops else None
        em.sites = {sid: s for sid, s in em.sites.items() if ops is None or s["op"] in ops}
        choose_configs(graph, em, a.target, None, buckets, ctx)
        if a.meta:
            extra = json.loads(a.meta)
            for s in em.sites.values():
                for b in s.get("candidates", {}):
                    s["candidates"][b] = [{"meta": {**s["candidates"][b][-1]["meta"], **extra},
                                           "config_source": "probe"}]
        root = tmp / "art"
        for name, src in em.modules.values():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(src)
        entry = compile_ahead(graph, em, root, buckets, ctx,
                              Options(a.target, allow_fallback=True, log=lambda s: print(s, file=sys.stderr)))
    if a.json:
        print(json.dumps(entry, indent=1, sort_keys=True))
        return 0
    for r in entry["rejected"]:
        print(f"rejected {r['site']} {r['bucket']} {r['config_source']} {r['meta']}: {r['reason']}")
    for x in entry["launches"]:
        print(f"{x['site']:32s} {x['bucket']:11s} {x['kernel']:24s} regs={x['registers']:3d} "
              f"spill={x['spill_bytes']:5d} smem={x['shared_bytes']:6d} warps={x['num_warps']} stages={x['num_stages']}")
    for sid, s in sorted(em.sites.items()):
        for b, c in sorted(s.get("configs", {}).items()):
            print(f"chosen {sid} {b}: {c.get('config_source')} {c.get('meta')} {c.get('aot_note', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
