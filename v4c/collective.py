"""Ranks agree on kernel configs: under torch.distributed, rank 0 decides and broadcasts, so
every rank runs the same kernels. The configs travel as JSON bytes in a tensor (never pickled).
Below both the runtime and the tuner, which use it, so that neither imports the other."""
from __future__ import annotations

import json

import torch


def agree(configs: dict, device: str | torch.device = "cpu") -> dict:
    """Rank 0's ``configs`` on every rank (unchanged when torch.distributed is not running).
    ``device``: where the broadcast tensors live (CUDA for NCCL, CPU for gloo)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return configs
    rank0 = dist.get_rank() == 0
    data = json.dumps(configs, sort_keys=True).encode() if rank0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if rank0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())
