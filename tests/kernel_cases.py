"""Shared pieces of the attention and indexer kernel tests: dtype names and the positions of the
test batches (row 0 a full row after its prefix; row 1 shorter, its last two prefill tokens
padding, or a padding decode token)."""
import torch

SDT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
TDT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "u8": torch.uint8}


def positions(B, T, p0, pad_decode):
    pos = torch.full((B, T), -1, dtype=torch.int64)
    for b in range(B):
        n = T if b == 0 or T == 1 else max(T - 2, 0)
        pos[b, :n] = torch.arange(p0[b], p0[b] + n)
    if T == 1 and pad_decode:
        pos[1, 0] = -1
    return pos
