"""Inputs from users that used to end in a traceback, a hang or unbounded memory: deeply nested JSON,
malformed safetensors headers, configs that can never run, absurd --gpu-memory values, and a gloo peer
that goes away mid-run. Each must be an error naming the file / field / rank, and `v4c <cmd>: error:`
with exit code 2 on the command line."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from v4c.cli import main
from v4c.errors import CheckpointError, ConfigError
from v4c.io.checkpoint import INDEX, Checkpoint
from v4c.io.safetensors import SafetensorsFile
from v4c.model.config import LIMITS, V4Config
from v4c.model.presets import (FLASH_HUB_CONFIG, FLASH_OFFICIAL_CONFIG, PRO_HUB_CONFIG, PRO_OFFICIAL_CONFIG,
                               tiny_config_dict)

DEEP = "[" * 100_000 + "]" * 100_000  # well past the JSON decoder's recursion limit


def nested(depth: int) -> list:
    """A list nested ``depth`` deep, built without recursion."""
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


def raw_safetensors(path, header, data=b""):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)
    return path


def cli_error(capsys, argv) -> str:
    """Run the CLI; it must fail with exit code 2 and one `v4c <cmd>: error:` line. Returns stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"v4c {argv[0]}: error: "), err
    assert "Traceback" not in err
    return err


@contextlib.contextmanager
def deadline(seconds: float):
    """Turn a hang (an endless loop in Python code) into a test failure instead of a stuck run."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds}s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- config.json ----------------------------------------------------------------------------------------------
def test_deeply_nested_config_json_is_a_config_error(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"vocab_size": 1024, "extra": ' + DEEP + "}")
    with pytest.raises(ConfigError, match=r"config\.json: config is not a model config \(JSON nested too deeply"):
        V4Config.from_json_file(model / "config.json")
    err = cli_error(capsys, ["compile", str(model), "-o", str(tmp_path / "art")])
    assert str(model / "config.json") in err and "nested too deeply" in err


def test_deeply_nested_value_of_a_known_key_is_quoted_briefly():
    # the message quotes the bad value: a full repr of it would overflow the stack
    with pytest.raises(ConfigError, match=r"layer_types\[0\]: unknown kind \[\[\[.*\]\]\]; expected one of"):
        V4Config.from_dict(tiny_config_dict(layer_types=[nested(50_000)] * 4))
    with pytest.raises(ConfigError) as e:
        V4Config.from_dict(tiny_config_dict(scoring_func="x" * 1_000_000))
    assert str(e.value).startswith("scoring_func: 'xxx") and len(str(e.value)) < 300


@pytest.mark.parametrize("over, message", [
    ({"num_hidden_layers": 1025}, r"num_hidden_layers: 1025 exceeds the limit of 1024"),
    ({"sliding_window": 10**12}, r"sliding_window: 1000000000000 exceeds max_position_embeddings=4096"),
    ({"index_topk": 10**9}, r"index_topk: 1000000000 exceeds max_position_embeddings=4096"),
    ({"compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8192}},
     r"hca_ratio: 8192 exceeds max_position_embeddings=4096"),
    ({"max_position_embeddings": 2**24 + 1}, r"max_position_embeddings: 16777217 exceeds the limit of 16777216"),
    ({"vocab_size": 2**24 + 1}, r"vocab_size: 16777217 exceeds the limit of 16777216"),
    ({"hidden_size": 2**16 + 1}, r"hidden_size: 65537 exceeds the limit of 65536"),
    ({"num_attention_heads": 1026}, r"num_attention_heads: 1026 exceeds the limit of 1024"),
    ({"head_dim": 8192, "partial_rotary_factor": 16 / 8192}, r"head_dim: 8192 exceeds the limit of 4096"),
    ({"moe_intermediate_size": 10**6}, r"moe_intermediate_size: 1000000 exceeds the limit of 65536"),
    ({"n_routed_experts": 10**6}, r"n_routed_experts: 1000000 exceeds the limit of 16384"),
    ({"index_n_heads": 10**4}, r"index_n_heads: 10000 exceeds the limit of 1024"),
    ({"hc_sinkhorn_iters": 10**9}, r"hc_sinkhorn_iters: 1000000000 exceeds the limit of 1000"),
    ({"num_nextn_predict_layers": 10**6}, r"num_nextn_predict_layers: 1000000 exceeds the limit of 64"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 10**12}},
     r"rope_scaling\.original_max_position_embeddings: 1000000000000 exceeds the limit of 16777216"),
])
def test_configs_that_can_never_run_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        V4Config.from_dict(tiny_config_dict(**over))


def test_layer_bound_is_checked_before_the_schedules_are_built():
    # 10**9 layers used to build two 10**9-entry schedules (tens of GB) before any check
    with deadline(10):
        with pytest.raises(ConfigError, match=r"num_hidden_layers: 1000000000 exceeds the limit of 1024"):
            V4Config.from_dict(tiny_config_dict(num_hidden_layers=10**9, layer_types=None, mlp_layer_types=None))


def test_bad_bound_through_the_cli_names_file_and_field(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config_dict(sliding_window=10**12)))
    err = cli_error(capsys, ["compile", str(model), "-o", str(tmp_path / "art")])
    assert f"{model / 'config.json'}: sliding_window: 1000000000000 exceeds max_position_embeddings=4096" in err


def test_released_configs_pass_with_headroom(tmp_path, capsys):
    for d in (FLASH_HUB_CONFIG, PRO_HUB_CONFIG, FLASH_OFFICIAL_CONFIG, PRO_OFFICIAL_CONFIG):
        V4Config.from_dict(d)
    for preset in ("v4-flash", "v4-pro"):
        assert main(["init", str(tmp_path / preset), "--preset", preset]) == 0
        V4Config.from_json_file(tmp_path / preset / "config.json")
    capsys.readouterr()
    # a model twice V4-Pro's size in every dimension, with 16x its context, is still a valid config
    pro = V4Config.from_dict(PRO_HUB_CONFIG)
    big = pro.replace(hidden_size=2 * pro.hidden_size, num_attention_heads=2 * pro.num_attention_heads,
                      n_routed_experts=2 * pro.n_routed_experts, q_lora_rank=2 * pro.q_lora_rank,
                      moe_intermediate_size=2 * pro.moe_intermediate_size, vocab_size=2 * pro.vocab_size,
                      max_position_embeddings=16 * pro.max_position_embeddings, index_topk=2 * pro.index_topk)
    assert big.max_position_embeddings == 2**24
    V4Config.from_dict(dict(PRO_HUB_CONFIG, num_hidden_layers=122, compress_ratios=[4, 128] * 61))
    assert all(LIMITS[f] >= 4 * getattr(pro, f) for f in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                        "n_routed_experts", "moe_intermediate_size", "vocab_size"))


# -- safetensors headers and the checkpoint index --------------------------------------------------------------
@pytest.mark.parametrize("entry, problem", [
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, r"tensor 'w': unknown dtype \['F32'\]"),
    ({"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}, r"tensor 'w': unknown dtype \{'F32': 1\}"),
    ({"dtype": 4, "shape": [1], "data_offsets": [0, 4]}, r"tensor 'w': unknown dtype 4"),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 4]}, r"tensor 'w': shape '4' is not a list"),
    ({"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]}, r"tensor 'w': shape \[\[1\]\] is not a list"),
    ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, r"tensor 'w': shape \[1\.0\] is not a list"),
    # a dimension torch cannot represent, hidden behind a zero-element shape
    ({"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]},
     r"tensor 'w': shape \[18446744073709551616, 0\] is not a list of non-negative integers below 2\*\*63"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, r"tensor 'w': data_offsets \[0, 4, 8\] is not"),
    ({"dtype": "F32", "shape": [1], "data_offsets": "0-4"}, r"tensor 'w': data_offsets '0-4' is not"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [2**70, 2**70 + 4]}, r"tensor 'w': data_offsets .* is not"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
     r"truncated: header says 16 data bytes, file has 8 \(tensor 'w' ends past the end\)"),
])
def test_malformed_header_entry_names_file_and_tensor(tmp_path, entry, problem):
    p = raw_safetensors(tmp_path / "m.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: " + problem):
        SafetensorsFile(p)


def test_deeply_nested_header_and_index(tmp_path):
    p = raw_safetensors(tmp_path / "d.safetensors", ('{"w": ' + DEEP + "}").encode())
    with pytest.raises(CheckpointError, match=r"d\.safetensors: header is nested too deeply"):
        SafetensorsFile(p)
    (tmp_path / INDEX).write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match=INDEX.replace(".", r"\.") + r": cannot read the index: JSON nested too"):
        Checkpoint.open(tmp_path)


def test_header_messages_quote_values_briefly(tmp_path):
    name = "n" * 1_000_000
    p = raw_safetensors(tmp_path / "b.safetensors", {name: {"dtype": ["F32"] * 100_000, "shape": [1],
                                                            "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"b\.safetensors: tensor 'nnn.*': unknown dtype \['F32', .*\.\.\.\]") as e:
        SafetensorsFile(p)
    assert len(str(e.value)) < len(str(p)) + 400


def test_bad_header_through_the_cli(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config_dict()))
    raw_safetensors(model / "model.safetensors", {"model.embed_tokens.weight": {
        "dtype": ["BF16"], "shape": [1024, 256], "data_offsets": [0, 524288]}})
    err = cli_error(capsys, ["compile", str(model), "-o", str(tmp_path / "art")])
    assert f"{model / 'model.safetensors'}: tensor 'model.embed_tokens.weight': unknown dtype ['BF16']" in err


# -- v4c inspect --gpu-memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gb", ["0", "nan", "inf", "1e9", "-80"])
def test_gpu_memory_must_be_a_sane_card_size(tiny_artifact, capsys, gb):
    # 0 used to print ~10**330 GPUs, nan a 1-GPU split, -80 to loop for ever
    with deadline(30):
        err = cli_error(capsys, ["inspect", str(tiny_artifact), "--gpu-memory", "80", gb])
    assert "--gpu-memory must be a card size in GB from 0.001 to 100000, got" in err


def test_gpu_memory_in_range_still_works(tiny_artifact, capsys):
    assert main(["inspect", str(tiny_artifact), "--json", "--gpu-memory", "0.001", "80", "100000"]) == 0
    per_gpu = json.loads(capsys.readouterr().out)["weights"]["per_gpu"]
    assert [g["gpu_memory_gb"] for g in per_gpu] == [0.001, 80, 100000]


# -- a gloo peer that goes away --------------------------------------------------------------------------------
WORKER = r"""
import os, sys, time, traceback
from pathlib import Path
import torch
from v4c.runtime.distributed import load_distributed
art, out, rank = sys.argv[1], Path(sys.argv[2]), int(os.environ["RANK"])
try:
    model = load_distributed(art, device="cpu")
    if rank == 1:
        os._exit(0)  # the lost peer: gone without a word once loading is done
    time.sleep(0.5)
    model.generate(torch.tensor([[1, 2, 3]]), 2)
    (out / f"rank{rank}.ok").write_text("")
except BaseException as e:
    (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    os._exit(1)
os._exit(0)  # a gloo group whose peer has gone can abort a normal interpreter exit
"""


def test_lost_gloo_peer_is_an_error_naming_the_ranks(tmp_path):
    import v4c
    from v4c.model.random_weights import write_random_checkpoint
    art = v4c.compile(write_random_checkpoint(tiny_config_dict(), tmp_path / "ck"), tmp_path / "art",
                      target="cpu", world_size=2)
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    t0 = time.perf_counter()
    for r in (0, 1):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "V4C_DIST_TIMEOUT": "10", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(art), str(tmp_path)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [1, 0] and time.perf_counter() - t0 < 30
    err = (tmp_path / "rank0.err").read_text()
    first = err.splitlines()[0]
    assert first.startswith("V4CError: rank 0 of 2: a collective failed while "), err
    assert "rank 1 exited, crashed or stopped answering" in first
    assert "pair.cc" not in first  # gloo's source location is dropped; its own words are kept
