"""The ``export-onnx`` and ``import-onnx`` subcommands (parsing here; the work in commands.py)."""
from __future__ import annotations

from ..errors import V4CError


def _need_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise V4CError("this command needs the onnx package: pip install onnx onnxruntime "
                       "(in a v4c checkout: pip install -e \".[onnx]\")") from None
    from . import commands
    return commands


def add_onnx_commands(sub) -> None:
    x = sub.add_parser("export-onnx", help="an artifact's graph as an ONNX model (opens in Netron, runs in onnxruntime)")
    x.add_argument("artifact", help="a compiled artifact directory")
    x.add_argument("-o", "--output", required=True, help="the .onnx file (weights past 2 GB go to OUTPUT.data)")
    x.add_argument("--unfused", action="store_true", help="the graph before the fusion passes")
    x.set_defaults(fn=lambda a: _need_onnx().export_cmd(a))
    i = sub.add_parser("import-onnx", help="rebuild the IR text from an ONNX file that export-onnx wrote")
    i.add_argument("model", help="an .onnx file written by export-onnx")
    i.add_argument("-o", "--output", required=True, help="the IR text file to write")
    i.set_defaults(fn=lambda a: _need_onnx().import_cmd(a))
