"""`v4c serve` on a sharded artifact: 2 gloo ranks started by the command itself (torchrun), rank 0
taking the requests; greedy completions equal the unsharded model's, rows spread over both ranks."""
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch  # noqa: E402

import v4c  # noqa: E402
from v4c.cli import main  # noqa: E402
from v4c.model.presets import tiny_config_dict  # noqa: E402
from v4c.model.random_weights import write_random_checkpoint  # noqa: E402
from serve_process import free_port, wait_healthy  # noqa: E402

PROMPTS = (5, 13, 9, 21)  # 4 requests on 4 rows: under attn=dp rows 0-1 live on rank 0, 2-3 on rank 1
NEW = 8


@pytest.mark.parametrize("parallel", ["attn=dp", pytest.param("ep=2,attn=tp", marks=pytest.mark.slow)])
def test_two_ranks_serve_what_one_process_generates(tmp_path, parallel):
    ckpt = write_random_checkpoint(tiny_config_dict(), tmp_path / "ckpt", seed=4)
    art = v4c.compile(ckpt, tmp_path / "sharded", target="cpu", world_size=2, parallel=parallel)
    vocab = tiny_config_dict()["vocab_size"]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPTS]
    ref = v4c.load(art, device="cpu")  # the same artifact's unsharded graph, in this process
    want = [ref.generate(torch.tensor([p]), NEW)[0, len(p):].tolist() for p in prompts]

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "V4C_DIST_TIMEOUT": "60"}
    # no --world-size: the artifact says 2, and the command starts both ranks
    p = subprocess.Popen([sys.executable, "-m", "v4c.cli", "serve", str(art), "--port", str(port),
                          "--max-batch", "4", "--max-context", "64", "--step-tokens", "16", "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(p, base, timeout=240)

        def ask(ids):
            r = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": "sharded", "prompt": ids, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        for _ in range(2):  # twice: the rows the first wave used are emptied and reused
            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(ask, prompts))
            assert got == want
        bad = httpx.post(f"{base}/v1/completions", timeout=60, json={"model": "sharded", "prompt": [vocab + 5],
                                                                     "max_tokens": 2})
        assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
        assert ask(prompts[0]) == want[0]  # and the ranks still agree afterwards
        metrics = httpx.get(f"{base}/metrics").text
        done = [ln for ln in metrics.splitlines() if ln.startswith("v4c_requests_total{") and 'reason="length"' in ln]
        assert len(done) == 1 and done[0].endswith(" 9"), done  # 4 + 4 + 1, each to its max_tokens
    finally:
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: torchrun passes it on, rank 0 stops its followers
        try:
            out = p.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out = p.communicate()[0]
            raise AssertionError(f"the ranks did not stop on Ctrl-C:\n{out[-3000:]}")
    assert f"on http://127.0.0.1:{port}/v1" in out and "2 ranks" in out, out[-3000:]


def test_bad_world_size_is_refused(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(tiny_config_dict()))
    assert main(["serve", str(tmp_path / "cfg"), "--world-size", "0"]) == 2
    assert "--world-size must be >= 1, got 0" in capsys.readouterr().err
