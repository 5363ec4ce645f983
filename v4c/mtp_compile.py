"""Compiling the MTP block (spec A.10): whether an artifact gets one, its graph, and the one view of the
main graph and the block that kernels are emitted, chosen and compiled ahead of time for.

``mtp="auto"`` compiles the block when the checkpoint holds a complete one (``mtp.0.*`` matching the
config, in either naming); a checkpoint without it, or with an incomplete one, compiles without it
(no speculation) and the artifact records why. ``"on"`` requires it (a weight-free compile then
follows the release's layout); ``"off"`` never compiles it.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, WeightMismatchError
from .graph.ir import Graph
from .graph.verify import verify
from .io.checkpoint import Checkpoint
from .io.naming import has_mtp, plan_sources
from .model.config import V4Config
from .model.mtp import build_mtp_graph
from .model.weight_quant import quantized_graph

MODES = ("auto", "on", "off")


def mtp_graph(cfg: V4Config, cfg_path: Path, checkpoint: Path | None, mode: str, dtype: str,
              world_size: int = 1) -> tuple[Graph | None, str]:
    """The MTP block's verified (unfused) graph in the checkpoint's weight formats, or None, and a line
    saying what was decided and why."""
    if mode not in MODES:
        raise ValueError(f"mtp must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return None, "mtp: off (not compiled)"

    def skip(why: str):
        if mode == "on":
            raise ConfigError(f"--mtp on: {why}")
        return None, f"mtp: not compiled: {why}"

    if cfg.num_nextn_predict_layers < 1:
        return skip("the config has num_nextn_predict_layers = 0")
    if world_size != 1:
        return skip("sharded artifacts do not take the MTP block yet")
    if checkpoint is None:
        if mode == "auto":
            return None, "mtp: not compiled: a weight-free compile includes it only with --mtp on"
        return verify(quantized_graph(build_mtp_graph(cfg, dtype), cfg_path)), "mtp: compiled (release layout)"
    g = verify(quantized_graph(build_mtp_graph(cfg, dtype), cfg_path, checkpoint, part="mtp"))
    with Checkpoint.open(checkpoint) as ck:
        if not has_mtp(ck):
            return skip("the checkpoint has no MTP block (mtp.0.*)")
        try:
            plan_sources(ck, dict(g.params), part="mtp")
        except WeightMismatchError as e:
            if mode == "on":
                raise
            lines = str(e).splitlines()
            return None, f"mtp: not compiled: the checkpoint's MTP block does not match the config ({lines[0]})"
    return g, "mtp: compiled"


def kernel_view(main: Graph, mtp: Graph | None) -> Graph:
    """One graph holding the main graph's nodes and the MTP block's, for what is decided per call site
    (kernel modules, configs per shape bucket, ahead-of-time launches): never run or verified. The two
    share only their inputs ``ids``/``pos`` and the embedding and LM head, of one type in both."""
    if mtp is None:
        return main

    def union(a, b, what):
        have = dict(a)
        for n, t in b:
            if n in have and have[n] != t:
                raise ValueError(f"{what} %{n} is {have[n]} in the main graph and {t} in the MTP graph")
        return tuple(a) + tuple((n, t) for n, t in b if n not in have)

    return main.replace(inputs=union(main.inputs, mtp.inputs, "input"), params=union(main.params, mtp.params, "param"),
                        states=union(main.states, mtp.states, "state"), nodes=main.nodes + mtp.nodes,
                        outputs=main.outputs + mtp.outputs, state_outputs=main.state_outputs + mtp.state_outputs,
                        state_decls=main.state_decls + mtp.state_decls)
