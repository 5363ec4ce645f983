"""ONNX interchange: an artifact's graph out to ONNX (standard ops, fused ops as ``ai.v4c``
functions) and back to the IR. Needs the ``onnx`` extra; importing this package alone does not
(the CLI registers its commands without it), the names below load on first use."""
_NAMES = {"artifact_graph": "commands", "export_artifact": "commands", "graph_to_onnx": "export",
          "save_model": "export", "import_onnx": "importer", "onnx_to_graph": "importer", "NotV4COnnx": "importer"}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
