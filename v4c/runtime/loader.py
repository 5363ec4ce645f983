"""``v4c.load``: verify an artifact's manifest, then map its weights and build a Model."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..artifact.manifest import open_weights, verify_artifact
from ..graph.text import parse_graph
from ..graph.verify import verify
from ..settings import configure_malloc, configure_threads
from ..io.naming import plan_sources
from ..backends import ALIASES, NAMES, for_artifact
from ..backends.triton import install_binaries
from .model import Model, cast_param
from .mtp import load_mtp


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support (torch " + torch.__version__ + ")"
                   if torch.version.cuda is None else "no CUDA GPU is visible")
            raise ValueError(f"device {device!r}: {why}; run with --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: v4c runs on cpu or cuda")
    return dev


BACKENDS = (*NAMES, *ALIASES)  # every name `backend=` takes (ALIASES: former names)


def load(path: str | os.PathLike, device=None, verify_weights: bool = False, backend: str | None = None,
         cuda_graphs: bool = True) -> Model:
    """Load the artifact at ``path``; every file is checked against the manifest first.

    ``backend``: "triton" runs the artifact's kernels (natively on CUDA, through Triton's
    interpreter on CPU, which needs TRITON_INTERPRET=1 before triton is imported); "cpu" the
    fast PyTorch implementations and C helpers (``v4c/backends/cpu``) where an op has one and its
    reference elsewhere; "reference" the ops' references only (the definition, for debugging).
    Default: triton on CUDA, cpu on CPU. ``Model.implementations()`` says what runs each node.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    man = verify_artifact(Path(path), full_weights=verify_weights)
    root = man.root
    # read through the manifest: each file's bytes are checked against its hash right before use
    config = man.config()
    graph = verify(parse_graph(man.graph_text()))
    dev = _device(device)
    if dev.type == "cpu":
        configure_threads()
        configure_malloc()
    params, mtp_text = None, man.mtp_graph_text()
    mtp_graph = verify(parse_graph(mtp_text)) if mtp_text is not None else None
    if man.has_weights:
        ckpt = open_weights(man)  # exactly the files the manifest names, never an index found beside them
        sources = plan_sources(ckpt, dict(graph.params))
        params = {n: cast_param(sources[n].load(ckpt), t.dtype, dev) for n, t in graph.params}
        if mtp_graph is not None:  # the MTP block's own tensors; the embedding and LM head are shared
            mtp_sources, mtp_types = plan_sources(ckpt, dict(mtp_graph.params), part="mtp"), dict(mtp_graph.params)
            mtp_param = lambda n: cast_param(mtp_sources[n].load(ckpt), mtp_types[n].dtype, dev)  # noqa: E731
    kernels = man.kernels()
    if backend in ("triton", None) and dev.type == "cuda" and kernels.get("ops"):
        major, minor = torch.cuda.get_device_capability(dev)
        install_binaries(root, man.aot(), f"sm{major}{minor}", files=man.files)
    chosen = for_artifact(backend, dev.type, root, kernels)
    model = Model(root, config, graph, params, dev, man.data, backend=chosen, cuda_graphs=cuda_graphs)
    model.mtp_note = man.mtp_note
    if mtp_graph is not None and params is not None:
        model.mtp = load_mtp(mtp_graph, params, mtp_param, chosen, dev)
    return model
