"""Renders the kernel templates an artifact needs into its ``kernels/`` folder, and lists its call sites.

Each template family (``templates/<family>.py``) becomes one module file named by its content hash
(``artifact/layout.py``); the kernel table lists every module with its SHA-256, and every kernel call
site of the graph (``graph/sites.py``) with the launcher that runs it: the family's launcher for the op,
the ``qgemm`` launcher for calls on quantised weights (``quantized.py``), or the op's PyTorch reference
where no kernel takes the call.
Meta-parameters per site and shape bucket are chosen afterwards (``autotune/choose.py``, checked by
``v4c/aot`` for GPU targets). Ops with no kernel at all run on their PyTorch reference.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
from dataclasses import dataclass, field
from importlib import resources

from .. import __version__
from ..artifact.layout import kernel_module
from ..graph.ir import Graph
from ..graph.sites import call_sites, token_input
from .quantized import FAMILY as QFAMILY, KERNEL as QKERNEL, mismatch, quantised_inputs

FAMILIES = ("gemm", "mhc", "moe", "attention", "indexer", "compressor", "qgemm")


def template(family: str):
    """The template module of ``family`` (imports triton)."""
    return importlib.import_module(f"v4c.codegen.templates.{family}")


def kernel_table() -> dict[str, str]:
    """IR op -> the template family that implements it."""
    return {op: fam for fam in FAMILIES for op in getattr(template(fam), "KERNELS", {}) if fam != QFAMILY}


def quantized_launchers() -> dict[str, str]:
    """IR op -> the family whose ``QUANTIZED`` table runs its calls on quantised weights (``qgemm`` first)."""
    out: dict[str, str] = {}
    for fam in (QFAMILY, *FAMILIES):
        for op in getattr(template(fam), "QUANTIZED", {}):
            out.setdefault(op, fam)
    return out


@dataclass
class Emitted:
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # family -> (file name, source)
    ops: dict[str, dict] = field(default_factory=dict)  # op -> {"module": family, ...}: ops with a kernel
    fallback: list[str] = field(default_factory=list)  # ops that run on their PyTorch reference
    # site id -> {"op", "module", "launcher", "kernel", "tokens_input", "nodes", "configs": {bucket: {...}}}
    sites: dict[str, dict] = field(default_factory=dict)

    def add_module(self, family: str, target: str) -> None:
        if family not in self.modules:
            src = render(family, target)
            self.modules[family] = (kernel_module(family, hashlib.sha256(src.encode()).hexdigest()), src)

    def module_entry(self, family: str) -> dict:
        name, src = self.modules[family]
        return {"file": name, "sha256": hashlib.sha256(src.encode()).hexdigest()}

    def table(self) -> dict:
        """The kernel table the artifact records (``ArtifactWriter.set_kernels``)."""
        sites = {sid: {k: v for k, v in s.items() if k != "candidates"} for sid, s in sorted(self.sites.items())}
        return {"modules": {f: self.module_entry(f) for f in sorted(self.modules)},
                "ops": dict(sorted(self.ops.items())), "fallback": sorted(self.fallback), "sites": sites}


INLINE = "# v4c: inline prelude"


def _top_level_names(tree: ast.Module) -> list[tuple[str, int]]:
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append((node.name, node.lineno))
        elif isinstance(node, ast.Assign):
            names += [(t.id, node.lineno) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append((node.target.id, node.lineno))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [((a.asname or a.name).split(".")[0], node.lineno) for a in node.names]
    return names


def _check_unique(family: str, source: str) -> None:
    """A rendered module defines every top-level name once: a later definition silently replacing the
    prelude's would make the artifact run other code than the templates' tests ran."""
    seen: dict[str, int] = {}
    for name, line in _top_level_names(ast.parse(source)):
        if name in seen:
            raise ValueError(f"kernel module '{family}': {name!r} is defined twice (lines {seen[name]} and {line} "
                             f"of the rendered module); a template must not redefine what the prelude defines")
        seen[name] = line


def _inline_prelude(body: str) -> str:
    """Replace the template's ``from .prelude import ...`` line with the prelude itself; the template's own
    import lines that the prelude already has are dropped."""
    prelude = resources.files("v4c.codegen.templates").joinpath("prelude.py").read_text()
    lines = body.splitlines(keepends=True)
    at = [i for i, ln in enumerate(lines) if ln.rstrip().endswith(INLINE)]
    if len(at) > 1 or any(".prelude" in ln and i not in at for i, ln in enumerate(lines) if "import" in ln):
        raise ValueError("a template may import the prelude once, on a line marked '# v4c: inline prelude'")
    if not at:
        return body
    have = {ln.strip() for ln in prelude.splitlines() if ln.startswith(("import ", "from "))}
    lines = [ln for i, ln in enumerate(lines) if i in at or ln.strip() not in have]
    at = [i for i, ln in enumerate(lines) if ln.rstrip().endswith(INLINE)][0]
    lines[at] = f"# ---- v4c prelude (inlined) ----\n{prelude}\n# ---- end of prelude ----\n"
    return "".join(lines)


def render(family: str, target: str) -> str:
    """A template's source with a provenance header; this text is what the artifact runs."""
    body = _inline_prelude(resources.files("v4c.codegen.templates").joinpath(f"{family}.py").read_text())
    header = (f"# v4c kernel module '{family}' for target {target}, rendered by v4c {__version__}.\n"
              f"# Loaded by the runtime only after its SHA-256 matches the artifact manifest.\n")
    source = header + body
    _check_unique(family, source)
    return source


def emit(graph: Graph, target: str) -> Emitted:
    """The kernel modules and call sites for every op of ``graph`` that has a template."""
    table = kernel_table()
    out = Emitted()
    types = graph.value_types()
    for op in sorted({n.op for n in graph.nodes}):
        if op in table:
            out.ops[op] = {"module": table[op]}
            out.add_module(table[op], target)
        else:
            out.fallback.append(op)
    quantized = None
    for sid, nodes in call_sites(graph, set(out.ops)).items():
        node = nodes[0]
        site = {"op": node.op, "tokens_input": token_input(node, types), "nodes": len(nodes)}
        found = quantised_inputs(graph, node)
        if found:
            quantized = quantized if quantized is not None else quantized_launchers()
            reason = mismatch(node, found)
            if reason is None and node.op not in quantized:
                reason = f"no quantised kernel for {node.op}"
            if reason is None:
                fam = quantized[node.op]
                out.add_module(fam, target)
                site.update(module=fam, launcher="QUANTIZED", kernel=QKERNEL[node.op])
            else:
                site.update(module=None, launcher=None, kernel=None, reason=reason)
        else:
            site.update(module=out.ops[node.op]["module"], launcher="KERNELS", kernel=node.op)
        out.sites[sid] = site
    return out
