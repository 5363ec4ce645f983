"""Data flows one way: the runtime loads what the compiler wrote and imports nothing from the passes,
the code generator, the tuner or the AOT compiler (so a deployment needs none of them)."""
import ast
from pathlib import Path

import pytest

import v4c

ROOT = Path(v4c.__file__).parent
UPSTREAM = ("passes", "codegen", "autotune", "aot")


def _imports(path: Path, package: str):
    """Absolute module names ``path`` imports (relative imports resolved against ``package``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


@pytest.mark.parametrize("layer,upstream", [
    ("runtime", UPSTREAM),
    ("backends", UPSTREAM + ("runtime",)),  # the runtime binds backends' implementations, not the reverse
    ("artifact", UPSTREAM + ("runtime", "backends", "compiler")),  # the layout below everything that uses it
])
def test_the_runtime_imports_nothing_upstream(layer, upstream):
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        package = ".".join(rel.parts[:-1]) if rel.name != "__init__" else ".".join(rel.parts[:-1])
        for mod in _imports(path, package):
            if any(mod == f"v4c.{u}" or mod.startswith(f"v4c.{u}.") for u in upstream):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_the_check_sees_a_relative_import_upstream(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from ..autotune.agree import agree\nfrom . import session\n")
    assert "v4c.autotune.agree" in set(_imports(f, "v4c.runtime"))
    assert "v4c.runtime.session" in set(_imports(f, "v4c.runtime"))
