"""Ranks agree on kernel configs: two gloo ranks with different local choices end up with rank 0's."""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from v4c.collective import agree


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _rank(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = {"q_proj": {"BLOCK_M": 16 * (rank + 1), "num_warps": 4}, "rank": rank}
        got = agree(local)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_rank0_configs(tmp_path):
    mp.spawn(_rank, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    assert all(r == {"q_proj": {"BLOCK_M": 16, "num_warps": 4}, "rank": 0} for r in results)


def test_single_process_is_unchanged():
    assert agree({"a": 1}) == {"a": 1}
    assert not (dist.is_available() and dist.is_initialized())
    assert torch.__version__
