"""Kernel tests run the kernel modules exactly as an artifact holds them: each template rendered with the
prelude inlined (``v4c.codegen.emit.render``, the text ``v4c compile`` writes into ``kernels/``) is put in
place of the template module, so ``from v4c.codegen.templates import attention`` imports that rendered
text. They run under Triton's interpreter, which must be switched on before triton is imported."""
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")


def _install_rendered_modules() -> None:
    import v4c.codegen.templates as package
    from v4c.codegen.emit import FAMILIES, render
    where = Path(tempfile.mkdtemp(prefix="v4c-rendered-kernels-"))
    atexit.register(shutil.rmtree, where, True)
    for fam in FAMILIES:
        name = f"{package.__name__}.{fam}"
        path = where / f"{fam}.py"
        path.write_text(render(fam, "cpu"))
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(package, fam, mod)


_install_rendered_modules()
