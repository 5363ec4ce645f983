"""Renders the kernel templates an artifact needs into its ``kernels/`` folder.

Each template family (``templates/<family>.py``) becomes one module file named by its
content hash; the manifest lists every module with its SHA-256 and, per IR op, the
module that implements it and the meta-parameters chosen for it, plus, for ops with calls on
quantised weights, the ``qgemm`` variant that runs those (or "reference": see ``quantized.py``).
Ops with no kernel are listed as running on their PyTorch reference.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from importlib import resources

from .. import __version__
from ..graph.ir import Graph
from .quantized import quantized_variants

FAMILIES = ("gemm", "mhc", "moe", "attention", "indexer", "compressor", "qgemm")


def _template(family: str):
    try:
        return importlib.import_module(f"v4c.codegen.templates.{family}")
    except ModuleNotFoundError as e:
        if e.name == f"v4c.codegen.templates.{family}":
            return None  # a family not written yet: its ops run on their references
        raise


def kernel_table() -> dict[str, str]:
    """IR op -> the template family that implements it."""
    table = {}
    for fam in FAMILIES:
        mod = _template(fam)
        for op in getattr(mod, "KERNELS", {}) if mod else {}:
            table[op] = fam
    return table


@dataclass
class Emitted:
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # family -> (file name, source)
    ops: dict[str, dict] = field(default_factory=dict)  # op -> {"module": family, "meta": {...}}
    fallback: list[str] = field(default_factory=list)  # ops that run on their PyTorch reference

    def manifest_entry(self) -> dict:
        return {"modules": {f: {"file": name, "sha256": hashlib.sha256(src.encode()).hexdigest()}
                            for f, (name, src) in sorted(self.modules.items())},
                "ops": dict(sorted(self.ops.items())), "fallback": sorted(self.fallback)}


INLINE = "# v4c: inline prelude"


def _inline_prelude(body: str) -> str:
    """Replace the template's ``from .prelude import ...`` line with the prelude itself."""
    prelude = resources.files("v4c.codegen.templates").joinpath("prelude.py").read_text()
    lines = [ln for ln in body.splitlines(keepends=True)]
    at = [i for i, ln in enumerate(lines) if ln.rstrip().endswith(INLINE)]
    if len(at) > 1 or any(".prelude" in ln and i not in at for i, ln in enumerate(lines) if "import" in ln):
        raise ValueError("a template may import the prelude once, on a line marked '# v4c: inline prelude'")
    if at:
        lines[at[0]] = f"# ---- v4c prelude (inlined) ----\n{prelude}\n# ---- end of prelude ----\n"
    return "".join(lines)


def render(family: str, target: str) -> str:
    """A template's source with a provenance header; this text is what the artifact runs."""
    body = _inline_prelude(resources.files("v4c.codegen.templates").joinpath(f"{family}.py").read_text())
    header = (f"# v4c kernel module '{family}' for target {target}, rendered by v4c {__version__}.\n"
              f"# Loaded by the runtime only after its SHA-256 matches the artifact manifest.\n")
    return header + body


def emit(graph: Graph, target: str, configs: dict[str, dict] | None = None) -> Emitted:
    """The kernel modules for every op of ``graph`` that has a template; ``configs`` (op -> meta)
    overrides the templates' defaults (the tuner's choices)."""
    table = kernel_table()
    out = Emitted()
    for op in sorted({n.op for n in graph.nodes}):
        fam = table.get(op)
        if fam is None:
            out.fallback.append(op)
            continue
        if fam not in out.modules:
            src = render(fam, target)
            out.modules[fam] = (f"kernels/{fam}-{hashlib.sha256(src.encode()).hexdigest()[:12]}.py", src)
        meta = dict(_template(fam).DEFAULT_META[op])
        meta.update((configs or {}).get(op, {}))
        out.ops[op] = {"module": fam, "meta": meta}
    # calls on quantised weights: the qgemm launcher, or the op's reference (ops without a kernel run
    # their reference for every call already)
    for op, variant in quantized_variants(graph).items():
        if op not in out.ops:
            continue
        fam = variant["module"]
        if fam is not None and fam not in out.modules:
            src = render(fam, target)
            out.modules[fam] = (f"kernels/{fam}-{hashlib.sha256(src.encode()).hexdigest()[:12]}.py", src)
        out.ops[op]["quantized"] = variant
    return out
