"""The model a plan is about: an artifact as compiled, or a config-only (or checkpoint) directory built
weight-free in memory with the same graph builder, weight formats and passes `v4c compile` runs, so
every byte and FLOP is the one `v4c inspect --json` gives. Rank graphs come from the same `shard` pass
a `--world-size` compile writes into the artifact."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..artifact import has_manifest, open_artifact
from ..graph.ir import Graph
from ..graph.verify import verify
from ..model.config import V4Config
from .devices import GPU

DTYPE = "bf16"  # activations of a GPU deployment


@dataclass
class ModelSource:
    path: Path
    config: V4Config
    graph: Graph           # unsharded, fused, in its cache formats
    kv_cache: str
    indexer_cache: str
    formats_from: str      # "artifact" (fixed at compile time) or why the plan picked them
    artifact: object = None
    _ranks: dict = field(default_factory=dict)
    pools: dict = field(default_factory=dict)  # serving pools built on this model (v4c.plan.choose.pool_for)

    def rank_graph(self, world: int, parallel: str | None) -> Graph:
        """Rank 0's graph of ``world`` ranks laid out as ``parallel``: the first ranks take the extra expert
        and sequence (and, tensor-parallel, the shared expert), so rank 0 is the fullest and the slowest."""
        if world == 1:
            return self.graph
        from ..passes.shard import parse_parallel, shard_graph
        par = parse_parallel(parallel, world)
        key = (world, par.spec())
        if key not in self._ranks:
            stored = self.artifact.parallel() if self.artifact is not None else None
            if stored and (stored["world_size"], f"ep={stored['ep']},attn={stored['attn']}") == key:
                self._ranks[key] = self.artifact.graph(rank=0)  # the artifact's own plan
            else:
                self._ranks[key] = shard_graph(self.graph, par, 0)
        return self._ranks[key]


def _formats(cfg: V4Config, g: GPU) -> tuple[str, str, str]:
    from ..passes.pipeline import production_formats
    if not production_formats(cfg):
        return "auto", "auto", "a small layout: caches in the activation dtype, as `v4c compile` does"
    if g.has("fp4"):
        return "fp8", "fp4", f"fp8 rows, MXFP4 indexer keys ({g.key} has FP4 tensor cores for the indexer scan)"
    return "fp8", "fp8", f"fp8 rows and fp8 indexer keys ({g.key} has no FP4 tensor cores for an FP4 indexer scan)"


def load_model(path, g: GPU) -> ModelSource:
    """An artifact (its graph and cache formats as compiled) or a model directory (built weight-free)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such artifact or model directory")
    if has_manifest(path):
        man = open_artifact(path)
        return ModelSource(path, V4Config.from_dict(man.config()), man.graph(), man.kv_cache, man.indexer_cache,
                           "artifact", man)
    from ..model.build import build_graph
    from ..model.weight_quant import quantized_graph
    from ..passes import PassManager, default_pipeline
    from ..passes.pipeline import resolve_cache_formats
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: neither an artifact nor a directory with a config.json")
    cfg = V4Config.from_json_file(cfg_path)
    kv_want, ix_want, why = _formats(cfg, g)
    kv, ix = resolve_cache_formats(cfg, DTYPE, kv_want, ix_want)
    # the weight formats follow the config (the release's FP8 / MXFP4), as a weight-free compile does
    graph = verify(quantized_graph(build_graph(cfg, DTYPE), cfg_path, None))
    graph = PassManager(default_pipeline(True, kv, ix), out=lambda s: None).run(graph)
    return ModelSource(path, cfg, graph, kv, ix, why)
