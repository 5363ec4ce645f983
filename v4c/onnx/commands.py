"""``v4c export-onnx`` and ``v4c import-onnx``: artifacts to ONNX files and back to IR text."""
from __future__ import annotations

import sys
from pathlib import Path

from ..artifact import open_artifact
from ..graph.text import print_graph
from ..graph.types import DTYPES
from ..graph.verify import verify
from .export import EXTERNAL_DATA_LIMIT, graph_to_onnx, save_model
from .importer import import_onnx


def artifact_graph(artifact: str | Path, unfused: bool = False):
    """The artifact's manifest and graph; ``unfused``: rebuilt from its config without the fusions
    (with the same cache formats)."""
    man = open_artifact(Path(artifact))
    graph = verify(man.graph())
    if unfused:
        from ..model.build import build_graph
        from ..model.config import V4Config
        from ..passes import PassManager, default_pipeline
        cfg = V4Config.from_dict(man.config())
        graph = PassManager(default_pipeline(False, man.kv_cache, man.indexer_cache)).run(build_graph(cfg, man.dtype))
    return man, graph


def export_artifact(artifact: str | Path, output: str | Path, unfused: bool = False,
                    external_limit: int = EXTERNAL_DATA_LIMIT) -> list[Path]:
    """Write the artifact's graph (with its weights as initializers, if it has any) as ONNX.
    Returns the files written (the model, and its external data when the weights are past the limit)."""
    man, graph = artifact_graph(artifact, unfused)
    params = None
    if man.has_weights:
        from ..io.naming import plan_sources
        ckpt = man.open_weights()  # exactly the files the manifest names, never an index found beside them
        try:
            sources = plan_sources(ckpt, dict(graph.params))
            params = {n: sources[n].load(ckpt).to(DTYPES[t.dtype]) for n, t in graph.params}
            model = graph_to_onnx(graph, params)
        finally:
            ckpt.close()
    else:
        model = graph_to_onnx(graph, None)
    return save_model(model, Path(output), external_limit)


def export_cmd(a) -> int:
    files = export_artifact(a.artifact, a.output, unfused=a.unfused)
    print("\n".join(str(f) for f in files))
    return 0


def import_cmd(a) -> int:
    graph = import_onnx(a.model)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(print_graph(graph))
    print(f"{out}: {len(graph.nodes)} nodes, {len(graph.params)} params, {len(graph.states)} states",
          file=sys.stderr)
    return 0
