"""One rank of the multi-rank tests (started by tests/test_distributed.py with torchrun's environment:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Runs a fixed script of calls on a sharded artifact and
writes what it got to OUT/rank{R}.safetensors and OUT/rank{R}.json; a failure goes to OUT/rank{R}.err.

    python dist_worker.py ARTIFACT OUT
"""
import json
import os
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

from v4c.runtime.distributed import load_distributed

BATCH, PREFILL, DECODE, NEW = 4, 13, 6, 6


def script_ids(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return (torch.randint(0, vocab, (BATCH, PREFILL + DECODE), generator=g),
            torch.randint(0, vocab, (BATCH, 9), generator=g))


LENGTHS = [PREFILL, 11, PREFILL, 7]  # rows 1 and 3 are right-padded in the prefill


def run_script(model, rank: int = 0) -> tuple[torch.Tensor, list, int]:
    """Prefill (rows of different lengths), decode steps, then greedy generate: (logits, tokens, state bytes)."""
    ids, prompt = script_ids(model.config.vocab_size)
    session = model.new_session(BATCH)
    # rank 0's request is the one that counts: the others pass nothing
    got = [session.forward(ids[:, :PREFILL] if rank == 0 else None, lengths=LENGTHS if rank == 0 else None)]
    for t in range(PREFILL, PREFILL + DECODE):
        got.append(session.forward(ids[:, t:t + 1] if rank == 0 else None))
    tokens = model.generate(prompt, NEW)
    return torch.cat(got, 1), tokens.tolist(), session.memory()["total"]


def main(art: str, out: str) -> None:
    rank = int(os.environ["RANK"])
    out_dir = Path(out)
    try:
        logits, tokens, state = run_script(load_distributed(art), rank)
        save_file({"logits": logits.contiguous()}, str(out_dir / f"rank{rank}.safetensors"))
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"tokens": tokens, "state_bytes": state}))
    except BaseException as e:  # noqa: BLE001 - the test reads the message
        (out_dir / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        sys.stdout.flush()
        os._exit(1)  # at once: a peer that already left must not make the process group abort the exit
    sys.stdout.flush()
    os._exit(0)  # likewise on success: tearing down a gloo group whose peer has gone can abort (SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
