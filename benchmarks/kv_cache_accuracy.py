"""Accuracy of the quantised KV-cache formats on the tiny model, against the fp32 cache.

A 200-token greedy decode runs with the fp32 cache; the same tokens are then fed
(teacher-forced, one per step) through artifacts compiled with other cache formats, and
each step's logits are compared with the fp32 run: top-1 agreement, max and mean absolute
logit error (relative to the fp32 logits' max |value|).

    python benchmarks/kv_cache_accuracy.py [--steps 200] [--seed 0] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import v4c
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint

FORMATS = [("bf16", "bf16"), ("fp8", "fp32"), ("fp32", "fp8"), ("fp32", "fp4"), ("fp8", "fp8"), ("fp8", "fp4")]


def decode_logits(model, prompt, tokens):
    s = model.new_session(1, max_context=prompt.shape[1] + len(tokens) + 1)
    out = [s.forward(prompt)[:, -1]]
    for t in tokens[:-1]:
        out.append(s.forward(torch.tensor([[t]]))[:, -1])
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="v4c-kvacc-"))
    ck = write_random_checkpoint(tiny_config_dict(), tmp / "ck", seed=a.seed)
    ref = v4c.load(v4c.compile(ck, tmp / "fp32", kv_cache="fp32", indexer_cache="fp32"))
    prompt = torch.randint(0, ref.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(a.seed))
    tokens = ref.generate(prompt, a.steps)[0, 16:].tolist()
    base = decode_logits(ref, prompt, tokens)
    scale = base.abs().max()
    rows = []
    print(f"tiny model, seed {a.seed}, {a.steps} greedy steps after a 16-token prompt; reference: fp32 cache")
    print(f"{'kv':<6}{'indexer':<9}{'bytes/token':>12}{'top-1':>8}{'max err':>10}{'mean err':>10}{'s':>7}")
    for kv, ix in FORMATS:
        t0 = time.perf_counter()
        art = v4c.compile(ck, tmp / f"{kv}-{ix}", kv_cache=kv, indexer_cache=ix)
        got = decode_logits(v4c.load(art), prompt, tokens)
        from v4c.inspect import inspect_artifact
        bpt = inspect_artifact(art, context=4096)["kv_cache"]["bytes_per_token"]
        r = {"kv_cache": kv, "indexer_cache": ix, "bytes_per_token": bpt,
             "top1_agreement": (got.argmax(-1) == base.argmax(-1)).float().mean().item(),
             "max_rel_logit_error": ((got - base).abs().max() / scale).item(),
             "mean_rel_logit_error": ((got - base).abs().mean() / scale).item(),
             "seconds": time.perf_counter() - t0}
        rows.append(r)
        print(f"{kv:<6}{ix:<9}{bpt:>12.1f}{r['top1_agreement']:>8.1%}{r['max_rel_logit_error']:>10.4f}"
              f"{r['mean_rel_logit_error']:>10.4f}{r['seconds']:>7.1f}")
    if a.json:
        a.json.write_text(json.dumps({"steps": a.steps, "seed": a.seed, "machine": "cpu", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
