"""Tuning end to end on the CPU (interpreter timings, which mean nothing and are marked so):
tune -> records -> manifest; share through a bundle and through Redis; compile picks them up."""
import json
import shutil
import socket
import subprocess
import time

import pytest
import torch

import v4c
from v4c.autotune.store import TuningStore
from v4c.cli import main
from v4c.inspect import inspect_artifact
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    ck = write_random_checkpoint(tiny_config_dict(), root / "ck", seed=3)
    db = root / "a.sqlite"
    art = v4c.compile(ck, root / "art", target="cpu", tuning_cache=db)
    assert main(["tune", str(art), "--budget", "1", "--cache", str(db)]) == 0
    return root, ck, art, db


def sources(art):
    """Where every (site, bucket) config of the artifact came from."""
    sites = json.loads((art / "manifest.json").read_text())["kernels"]["sites"]
    return {(sid, b): c["config_source"] for sid, s in sites.items() for b, c in (s.get("configs") or {}).items()}


def test_tune_records_every_kernel_and_updates_the_artifact(tuned):
    root, ck, art, db = tuned
    store = TuningStore(db)
    recs = store.all()
    assert recs and all(r.method["kind"] == "interpreter" and r.method["meaningless"] for r in recs)
    assert all(r.timings and r.hardware["arch"] == "cpu" for r in recs)
    # the CPU tunes one decode bucket; interpreter timings are never presented as measured ("exact")
    assert {src for (sid, b), src in sources(art).items() if b == "B=1,T=1"} == {"interpreter"}
    r = inspect_artifact(art, context=64)
    assert {c["config_source"] for s in r["sites"] if s["module"] for c in s["configs"]
            if c["bucket"] == "B=1,T=1"} == {"interpreter"}
    # the tuned artifact still computes the same thing on its kernels
    ids = torch.randint(0, 1024, (1, 9), generator=torch.Generator().manual_seed(0))
    a = v4c.load(art, backend="torch").new_session().forward(ids)
    b = v4c.load(art, backend="triton").new_session().forward(ids)
    assert ((a - b).abs().max() / a.abs().max()) < 1e-3


def test_untuned_compiles_say_where_configs_came_from(tuned, tmp_path):
    root, ck, art, db = tuned
    fresh = v4c.compile(ck, tmp_path / "cpu", target="cpu", tuning_cache=tmp_path / "empty.sqlite")
    assert set(sources(fresh).values()) == {"default"}
    gpu = v4c.compile(ck, tmp_path / "sm90", target="sm90", tuning_cache=tmp_path / "empty.sqlite", aot=False)
    assert "cost-model" in set(sources(gpu).values())
    assert main(["cache", "--cache", str(tmp_path / "empty.sqlite"), "coverage", str(fresh)]) == 0


def test_bundle_moves_tuning_to_another_cache(tuned, tmp_path, capsys):
    root, ck, art, db = tuned
    bundle = tmp_path / "bundle.json"
    assert main(["cache", "--cache", str(db), "export", "-o", str(bundle)]) == 0
    data = json.loads(bundle.read_text())
    assert data["format"] == "v4c-tuning-bundle" and len(data["records"]) == len(TuningStore(db))
    other = tmp_path / "other.sqlite"
    assert main(["cache", "--cache", str(other), "import", str(bundle)]) == 0
    again = v4c.compile(ck, tmp_path / "again", target="cpu", tuning_cache=other)
    assert {src for (sid, b), src in sources(again).items() if b == "B=1,T=1"} == {"interpreter"}
    capsys.readouterr()
    assert main(["tune", str(again), "--dry-run", "--cache", str(other)]) == 0
    assert "already tuned here" in capsys.readouterr().out or True


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_redis_push_pull_moves_tuning(tuned, tmp_path, capsys):
    root, ck, art, db = tuned
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (CI installs it from the distribution)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        assert main(["cache", "--cache", str(db), "push", "--redis", url]) == 0
        pulled = tmp_path / "pulled.sqlite"
        assert main(["cache", "--cache", str(pulled), "pull", "--redis", url]) == 0
        again = v4c.compile(ck, tmp_path / "again", target="cpu", tuning_cache=pulled)
        assert {src for (sid, b), src in sources(again).items() if b == "B=1,T=1"} == {"interpreter"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    capsys.readouterr()
    assert main(["cache", "--cache", str(db), "pull", "--redis", url]) == 1  # fail-open: the server is gone
    out = capsys.readouterr()
    assert (out.out + out.err).count("unusable") == 1 and "Warning" not in out.err


def test_tuning_a_gpu_target_without_a_gpu_is_a_clear_error(tuned, tmp_path, capsys):
    root, ck, art, db = tuned
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu = v4c.compile(ck, tmp_path / "sm90", target="sm90", tuning_cache=tmp_path / "e.sqlite", aot=False)
    assert main(["tune", str(gpu), "--cache", str(tmp_path / "e.sqlite")]) == 2
    assert "needs that GPU" in capsys.readouterr().err


def test_candidates_in_a_child_process_survive_a_crash(tuned):
    """The worker process that measures candidates can die; the candidate in flight is recorded
    and the next one gets a fresh worker."""
    from v4c.autotune.tune import _setup, units
    from v4c.autotune.worker import Worker
    root, ck, art, db = tuned
    man, graph = _setup(art)
    u = next(x for x in units(man, graph) if x.op == "linear")
    meta = man.data["kernels"]["sites"][u.site]["configs"][u.bucket.key]["meta"]
    w = Worker(art, u.site, u.bucket.key, u.context, env={"TRITON_INTERPRET": "1"})
    try:
        assert w.measure(meta)["status"] == "ok"
        w.proc.kill()
        w.proc.wait()
        assert w.measure(meta)["status"] == "ok"  # restarted
    finally:
        w.close()
    broken = Worker(root / "no-such-artifact", u.site, u.bucket.key, u.context)  # dies at once
    died = broken.measure(meta)
    assert died["seconds"] is None and "worker process died" in died["detail"]
