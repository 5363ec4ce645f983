"""Kernel tests run Triton's interpreter on the CPU; it must be switched on before triton is imported."""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
