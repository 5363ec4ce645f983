"""Multi-rank runs on gloo: 2 and 4 CPU ranks (each a process started with torchrun's environment) against
the single-process run of the same artifact, both attention layouts; and the failures that must be errors
on every rank within seconds, not hangs."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import v4c
from dist_worker import LENGTHS, PREFILL, run_script
from v4c.errors import ConfigError
from v4c.inspect import inspect_artifact
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint

WORKER = Path(__file__).parent / "dist_worker.py"
TOL = 1e-5  # relative to the largest single-process logit
# 6 experts over 4 ranks is uneven (2, 2, 1, 1); 4 output groups give each of 4 tp ranks one group; 2 heads in
# 4 output groups: a group is half a head, so 2 tp ranks own one head each (and 4 ranks cannot split them)
MODELS = {"tiny": {}, "uneven": {"n_routed_experts": 6, "num_experts_per_tok": 3, "o_groups": 4},
          "half_heads": {"num_attention_heads": 2, "o_groups": 4}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, over in MODELS.items():
        out[name] = write_random_checkpoint(tiny_config_dict(**over), root / name, seed=3)
    return root, out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(arts, world: int, out: Path, ranks=None, timeout_s: float = 30, wait_s: float = 180):
    """Start ranks (all by default) of a ``world``-rank job; ``arts``: one artifact or one per rank.
    Returns ({rank: exit code}, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    port, procs = _port(), {}
    t0 = time.perf_counter()
    for r in ranks if ranks is not None else range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "V4C_DIST_TIMEOUT": str(timeout_s),
               "OMP_NUM_THREADS": "1"}
        art = arts[r] if isinstance(arts, (list, tuple)) else arts
        procs[r] = subprocess.Popen([sys.executable, str(WORKER), str(art), str(out)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    codes = {r: p.wait(timeout=wait_s) for r, p in procs.items()}
    return codes, time.perf_counter() - t0


@pytest.mark.parametrize("name,world,parallel", [
    ("tiny", 2, "attn=dp"), ("tiny", 2, "ep=2,attn=tp"), ("half_heads", 2, "attn=tp"),
    pytest.param("uneven", 4, "attn=dp", marks=pytest.mark.slow),  # 4 processes on 2 cores: 15-30 s each
    pytest.param("uneven", 4, "attn=tp", marks=pytest.mark.slow)])
def test_ranks_match_single_process(ckpts, name, world, parallel):
    root, ck = ckpts
    art = v4c.compile(ck[name], root / f"{name}-{world}-{parallel}", target="cpu", world_size=world,
                      parallel=parallel)
    codes, _ = spawn(art, world, root / f"out-{name}-{world}-{parallel}")
    out = root / f"out-{name}-{world}-{parallel}"
    errors = {r: (out / f"rank{r}.err").read_text()[:2000] for r in codes if (out / f"rank{r}.err").exists()}
    assert set(codes.values()) == {0}, errors
    # the reference: the same artifact's unsharded graph in this process
    want, want_tokens, full_state = run_script(v4c.load(art, device="cpu"))
    valid = torch.ones(want.shape[:2], dtype=torch.bool)
    for row, n in enumerate(LENGTHS):
        valid[row, n:PREFILL] = False  # padding positions of the prefill: logits are meaningless there
    for r in range(world):
        got = load_file(str(out / f"rank{r}.safetensors"))["logits"]
        err = ((got - want)[valid].abs().max() / want[valid].abs().max()).item()
        assert err <= TOL, f"rank {r}: relative error {err:.2e}"
        res = json.loads((out / f"rank{r}.json").read_text())
        assert res["tokens"] == want_tokens, f"rank {r} generated other tokens"
        # dp: each rank keeps only its own sequences' state; tp: every rank keeps the whole batch's
        share = 4 // world if parallel.endswith("dp") else 4
        assert res["state_bytes"] == full_state * share // 4


def test_plan_and_per_rank_inspect(ckpts):
    root, ck = ckpts
    art = v4c.compile(ck["uneven"], root / "plan-dp", target="cpu", world_size=4, parallel="ep=4,attn=dp")
    full = inspect_artifact(art, context=256, batch=8)
    plan = json.loads((art / "manifest.json").read_text())["parallel"]
    assert (plan["world_size"], plan["ep"], plan["attn"]) == (4, 4, "dp")
    experts = [dict((s[0], s[1:]) for s in rk["shards"])["model.layers.1.mlp.experts.gate_up_proj"]
               for rk in plan["ranks"]]
    assert experts == [[0, 0, 2], [0, 2, 4], [0, 4, 5], [0, 5, 6]]  # uneven: 2, 2, 1, 1
    ranks = full["ranks"]
    assert [x["sequences"] for x in ranks] == [2, 2, 2, 2]
    per_seq = full["kv_cache"]["total_bytes"]
    assert all(x["kv_bytes"] == 2 * per_seq for x in ranks)
    # every expert weight is on exactly one rank, every other weight on all four
    cfg = full["config"]
    expert_bytes = cfg["n_routed_experts"] * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 4 * \
        cfg["num_hidden_layers"]
    assert sum(x["weight_bytes"] for x in ranks) == 4 * (full["param_bytes"] - expert_bytes) + expert_bytes
    # two all-to-alls per MoE layer and decode step; a rank with fewer experts sends the same (balanced routing)
    assert all(x["collectives_per_decode_step"] == 2 * cfg["num_hidden_layers"] for x in ranks)
    assert ranks[0]["collective_bytes_per_decode_step"] > 0

    tp = inspect_artifact(v4c.compile(ck["uneven"], root / "plan-tp", target="cpu", world_size=4,
                                      parallel="attn=tp"), context=256, batch=8)
    assert all(x["kv_bytes"] == 8 * per_seq for x in tp["ranks"])  # one KV head: the cache on every rank
    assert all(x["collectives_per_decode_step"] == 2 * cfg["num_hidden_layers"] for x in tp["ranks"])


def test_layouts_that_do_not_divide_are_refused(ckpts):
    root, ck = ckpts
    with pytest.raises(ConfigError, match="2 output groups .* cannot be split over 4 ranks"):
        v4c.compile(ck["tiny"], root / "bad1", target="cpu", world_size=4, parallel="attn=tp")
    with pytest.raises(ConfigError, match="2 attention heads in 4 output groups cannot be split over 4 ranks in whole"):
        v4c.compile(ck["half_heads"], root / "bad5", target="cpu", world_size=4, parallel="attn=tp")
    with pytest.raises(ConfigError, match="only 6 routed experts"):
        v4c.compile(ck["uneven"], root / "bad2", target="cpu", world_size=8)
    with pytest.raises(ConfigError, match="ep=3 must be 1"):
        v4c.compile(ck["tiny"], root / "bad3", target="cpu", world_size=2, parallel="ep=3")
    with pytest.raises(ConfigError, match="attn=sp must be dp or tp"):
        v4c.compile(ck["tiny"], root / "bad4", target="cpu", world_size=2, parallel="attn=sp")
    assert not (root / "bad1").exists()


def test_missing_shard_on_one_rank_is_an_error_on_every_rank(ckpts):
    root, ck = ckpts
    art = v4c.compile(ck["tiny"], root / "whole", target="cpu", world_size=2)
    broken = root / "node1-copy"  # rank 1's node has a copy of the artifact without its weights file
    shutil.copytree(art, broken)
    (broken / "weights" / "model.safetensors").unlink()
    out = root / "out-missing"
    codes, seconds = spawn([art, broken], 2, out)
    assert codes == {0: 1, 1: 1}
    for r in (0, 1):
        err = (out / f"rank{r}.err").read_text()
        assert "loading failed on rank 1" in err and "weights/model.safetensors: missing" in err
    assert seconds < 60


def test_rank_that_never_starts_is_an_error_not_a_hang(ckpts):
    root, ck = ckpts
    art = v4c.compile(ck["tiny"], root / "lonely", target="cpu", world_size=2)
    out = root / "out-lonely"
    codes, seconds = spawn(art, 2, out, ranks=[0], timeout_s=3)
    assert codes == {0: 1}
    err = (out / "rank0.err").read_text()
    assert "rank 0: the process group of 2 ranks did not form within 3s" in err
    assert seconds < 30
