"""Where a compile writes: --force replaces only a v4c artifact, atomically, leaving nothing behind;
partial directories of killed compiles are removed by the next compile to the same place."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import v4c
from v4c.cli import main
from v4c.errors import ArtifactError
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config_dict()))
    return d


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_force_refuses_a_directory_that_is_not_an_artifact(tiny, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f").write_text("data")
    assert main(["compile", str(tiny), "-o", str(keep), "--target", "cpu", "--force"]) == 2
    err = capsys.readouterr().err
    assert "is a directory that is not a v4c artifact" in err and "--force replaces only v4c artifacts" in err
    assert (keep / "f").read_text() == "data" and _hidden(tmp_path) == []


def test_force_refuses_a_regular_file_and_leaves_nothing_behind(tiny, tmp_path, capsys):
    out = tmp_path / "out.v4c"
    out.write_text("not an artifact")
    assert main(["compile", str(tiny), "-o", str(out), "--target", "cpu", "--force"]) == 2
    assert "is a file that is not a v4c artifact" in capsys.readouterr().err
    assert out.read_text() == "not an artifact" and _hidden(tmp_path) == []


def test_force_never_replaces_the_checkpoint_being_compiled(tmp_path, capsys):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck")
    before = sorted(p.name for p in ck.iterdir())
    assert main(["compile", str(ck), "-o", str(ck), "--target", "cpu", "--force", "--weights", "reference"]) == 2
    assert "would replace the model being compiled" in capsys.readouterr().err
    assert sorted(p.name for p in ck.iterdir()) == before
    art = v4c.compile(ck, tmp_path / "art", target="cpu", weights="reference")
    # an artifact that holds the model being compiled (its copied weights) is not replaced either
    with pytest.raises(ArtifactError, match="would replace the model being compiled"):
        v4c.compile(art, art, target="cpu", overwrite=True)
    assert v4c.load(art, device="cpu") is not None


def test_force_replaces_an_artifact_atomically(tiny, tmp_path):
    out = tmp_path / "a.v4c"
    v4c.compile(tiny, out, target="cpu")
    first = json.loads((out / "manifest.json").read_text())["created"]
    (out / "stray").write_text("x")  # the old artifact goes, whole
    v4c.compile(tiny, out, target="cpu", overwrite=True)
    assert not (out / "stray").exists() and json.loads((out / "manifest.json").read_text())["created"] >= first
    assert _hidden(tmp_path) == []
    with pytest.raises(FileExistsError, match="--force"):
        v4c.compile(tiny, out, target="cpu")


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_partials_of_dead_compiles_are_removed_and_live_ones_kept(tiny, tmp_path):
    dead = tmp_path / f".a.v4c.{_dead_pid()}.abc123.partial"
    dead.mkdir()
    (dead / "weights.bin").write_bytes(b"\0" * 4096)
    old = tmp_path / f".a.v4c.old-{_dead_pid()}"
    old.mkdir()
    live = tmp_path / f".a.v4c.{os.getppid()}.def456.partial"  # a running process's: not ours to remove
    live.mkdir()
    other = tmp_path / f".b.v4c.{_dead_pid()}.ghi789.partial"  # another output's
    other.mkdir()
    logs = []
    v4c.compile(tiny, tmp_path / "a.v4c", target="cpu", log=logs.append)
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    assert any("left by an interrupted compile" in m and dead.name in m for m in logs)


def test_sigterm_during_a_compile_leaves_no_partial_directory(tmp_path):
    """A terminated compile removes its partial directory and exits with 128+15."""
    cfg = tmp_path / "flash"
    assert main(["init", str(cfg), "--preset", "v4-flash"]) == 0
    env = {**os.environ, "V4C_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache: seconds of work to interrupt
    p = subprocess.Popen([sys.executable, "-m", "v4c.cli", "compile", str(cfg), "-o", str(tmp_path / "out"),
                          "--target", "sm90", "--dtype", "bf16", "--no-aot"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(n.endswith(".partial") for n in _hidden(tmp_path)):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert "v4c compile: terminated" in err.decode()
    assert _hidden(tmp_path) == [] and not (tmp_path / "out").exists()
