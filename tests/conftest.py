import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import their helper modules by name
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# kernels run on this CPU under Triton's interpreter, which triton reads when it is imported: v4c
# itself never writes the environment (the v4c command does, for its own process)
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
_OWN_CACHE = None
if "V4C_CACHE_DIR" not in os.environ:  # tests never read or write the user's caches (tuning, AOT, C helpers)
    import tempfile
    _OWN_CACHE = os.environ["V4C_CACHE_DIR"] = tempfile.mkdtemp(prefix="v4c-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    """The cache directory the tests made for themselves goes when they are done."""
    if _OWN_CACHE is not None:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A compiled tiny random model (all layer kinds), shared by tests that only read it."""
    import v4c
    from v4c.model.presets import tiny_config_dict
    from v4c.model.random_weights import write_random_checkpoint
    root = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(tiny_config_dict(), root / "ckpt", seed=0)
    return v4c.compile(root / "ckpt", root / "art", target="cpu")
