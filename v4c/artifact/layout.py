"""Where each part of an artifact lives, relative to its root: the one place these names are spelt.

The writer (``writer.py``) lays files out under these names and records them in the manifest; the
reader (``manifest.py``) finds every file through the manifest, never by these names.
"""
from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"
CONFIG = "config.json"
GRAPH = "graph.v4c"
MTP_GRAPH = "mtp.v4c"           # the MTP block's graph (speculative decoding), when the artifact has one
TOKENIZER = "tokenizer.json"  # copied from the checkpoint when it has one (``v4c run --prompt``)
WEIGHTS = "weights"           # copied safetensors files (weights mode "copy")
KERNELS = "kernels"           # rendered Triton modules, one per template family
AOT = "aot"                   # ahead-of-time compiled kernel binaries, one directory per Triton cache key
RANKS = "ranks"               # each rank's graph of a sharded artifact


def rank_graph(rank: int) -> str:
    return f"{RANKS}/rank{rank}.v4c"


def kernel_module(family: str, digest: str) -> str:
    """A template family's rendered module, named by (the start of) its source's SHA-256."""
    return f"{KERNELS}/{family}-{digest[:12]}.py"


def aot_dir(key: str) -> str:
    return f"{AOT}/{key}"


def weight_file(name: str) -> str:
    return f"{WEIGHTS}/{name}"


def has_manifest(path: Path) -> bool:
    """Whether ``path`` holds a manifest, i.e. is meant as an artifact (not whether it is a valid one)."""
    return (Path(path) / MANIFEST).is_file()
