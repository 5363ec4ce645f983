"""The cpu backend on random V4 shapes, op by op: every node of a model, run by the implementation the cpu
backend bound for it, on the reference's own inputs, gives the reference node's outputs.

The fixed test models share a few shapes; these draw the ones they never have (one attention head, head
dims that are not multiples of 16, hidden sizes like 200, one or five mHC streams, 5 to 256 experts, windows
of 1 to 32, fp8 / bf16 / fp4 caches, ragged batches of up to 8 rows, 1,100-token prefills) and drive a
reference session through a ragged prefill, decode steps and a prefill chunk. Comparing each node on the
same inputs keeps every comparison tight: whole-model logits in bf16 drift apart through routing flips that
say nothing about any one op. Two outputs have an order or a choice that is not part of their meaning:
the router's top-k (unsorted in the reference) is compared as sets, and an indexer pick that differs
must be a tie (the reference's scores of both picks equal). A cache stored narrower than the model
(bf16, fp8, fp4) may hold the neighbouring code where a value came out an fp32 rounding apart: bf16
stores within 2^-8, packed ones in at most one byte in a thousand.

``V4C_RANDOM_CONFIGS=200 pytest tests/test_cpu_random_configs.py`` runs 200 seeds instead of the default.
"""
import os
import random

import pytest
import torch

import v4c
from v4c.graph.ops.attention import indexer_scores
from v4c.graph.ops.fused import RECIPES
from v4c.graph.registry import get_op
from v4c.model.random_weights import write_random_checkpoint
from random_shapes import random_config

SEEDS = range(int(os.environ.get("V4C_RANDOM_CONFIGS", "10")))


class _Capture:
    """Runs a fused op's recipe on the references, keeping the operands of one part."""

    def __init__(self, part: str):
        self.part, self.seen = part, None

    def __call__(self, op, *args, **attrs):
        if op == self.part:
            self.seen = (args, attrs)
        return get_op(op).ref(*args, **attrs)


def _untied_picks(args, attrs, ref, got) -> list:
    """The (row, query) positions where the cpu indexer's picks are not a tie of the reference's: the
    reference's own scores of the two pick sets differ."""
    cap = _Capture("indexer_topk")
    RECIPES["indexer"](cap, *args, **attrs)
    (q, w, keys, pos), a = cap.seen
    scores, _ = indexer_scores(q, w, keys, pos, ratio=a["ratio"], score_scale=a["score_scale"],
                               weight_scale=a["weight_scale"], key_format=a.get("key_format"))
    scores = torch.cat([scores, scores.new_full((*scores.shape[:2], 1), float("-inf"))], dim=-1)  # -1: no pick
    bad = []
    for b, t in {(b, t) for b, t, _ in (ref != got).nonzero().tolist()}:
        s_ref = scores[b, t][ref[b, t]].sort().values
        s_got = scores[b, t][got[b, t]].sort().values
        finite = torch.isfinite(s_ref) & torch.isfinite(s_got)
        scale = scores[b, t][torch.isfinite(scores[b, t])].abs().max().clamp_min(1e-6)
        if not (torch.equal(torch.isfinite(s_ref), torch.isfinite(s_got))
                and bool(((s_ref - s_got)[finite].abs() <= 1e-5 * scale).all())):
            bad.append((b, t, ref[b, t].tolist(), got[b, t].tolist()))
    return bad


def _canonical_routes(out):
    """The router's (experts, weights) sorted by expert per token (its top-k order is unspecified)."""
    idx, wts = out[0], out[1]
    experts, order = idx.sort(dim=-1)
    return experts, wts.gather(-1, order)


def _compare(name, args, attrs, ref, got, tol) -> list:
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    if name == "moe_router":
        ref, got = _canonical_routes(ref), _canonical_routes(got)
    problems = []
    for o, (x, y) in enumerate(zip(ref, got)):
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape:
            problems.append(f"{name} output {o}: shape {tuple(y.shape)}, reference {tuple(x.shape)}")
        elif x.dtype.is_floating_point:
            fin = torch.isfinite(x)
            if not torch.equal(fin, torch.isfinite(y)):
                problems.append(f"{name} output {o}: non-finite values differ")
            elif fin.any():
                # a bf16 store in an fp32 model (a bf16 cache): one value computed an fp32 rounding apart can round
                # to the neighbouring bf16 value, 2^-8 of itself at most
                bound = tol if x.dtype == torch.float32 else max(tol, 4e-3)
                err = float((x.float() - y.float())[fin].abs().max() / x.float()[fin].abs().max().clamp_min(1e-6))
                if err > bound:
                    problems.append(f"{name} output {o}: relative error {err:.2e} > {bound}")
        elif x.dtype == torch.uint8:  # a packed fp8 / fp4 cache: a value computed in another order of fp32 sums
            # can round to the neighbouring code, rarely; a wrong store changes many
            n = int((x != y).sum())
            if n > max(1, x.numel() // 1000):
                problems.append(f"{name} output {o}: {n} of {x.numel()} stored bytes differ")
        elif not torch.equal(x, y):
            untied = _untied_picks(args, attrs, x, y) if name == "indexer" else None
            if untied is None or untied:
                problems.append(f"{name} output {o}: {int((x != y).sum())} of {x.numel()} values differ"
                                + (f" (not ties: {untied[:2]})" if untied else ""))
    return problems


def _pair(ref_model, cpu_model, tol, problems):
    """Wrap each node of the reference's plans so that the cpu backend's implementation of the same node
    runs on a copy of the same operands, and their outputs are compared."""
    for phase, plan in ref_model.executor.plans.items():
        cpu_plan = cpu_model.executor.plans[phase]

        def wrap(entry, cpu_fn, phase=phase):
            fn, name = entry[0], entry[5]

            def both(*args, **attrs):
                copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                out = fn(*args, **attrs)
                got = cpu_fn(*copies, **attrs)
                problems.extend(f"{phase}: {p}" for p in _compare(name, copies, attrs, out, got, tol))
                return out
            return (both, *entry[1:])

        ref_model.executor.plans[phase] = [wrap(e, c[0]) for e, c in zip(plan, cpu_plan)]


@pytest.mark.parametrize("seed", SEEDS)
def test_every_cpu_node_equals_its_reference_on_random_shapes(tmp_path, seed):
    rng = random.Random(seed)
    cfg = random_config(rng)
    dtype = rng.choice(["f32", "bf16", "f16"])
    caches = dict(kv_cache=rng.choice(["auto", "bf16", "fp8"]), indexer_cache=rng.choice(["auto", "fp8", "fp4"]))
    T = rng.choice([1, 5, 16, 17, 40, 77, 130, 300, 1100])
    B = rng.choice([1, 2, 3, 8]) if T < 300 else 1
    steps, chunk = rng.choice([3, 9]), rng.choice([0, 3, 20, 40])
    lengths = [T] + [rng.randint(1, T) for _ in range(B - 1)] if rng.random() < 0.5 else None
    write_random_checkpoint(cfg, tmp_path / "ckpt", seed=seed, dtype=dtype)
    art = v4c.compile(tmp_path / "ckpt", tmp_path / "art", target="cpu", dtype=dtype, **caches)
    ref, cpu = v4c.load(art, backend="reference"), v4c.load(art, backend="cpu")
    problems: list[str] = []
    _pair(ref, cpu, 2e-5 if dtype == "f32" else 3e-2, problems)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        s = ref.new_session(B, max_context=T + steps + chunk + 1)
        logits = s.forward(torch.randint(0, cfg["vocab_size"], (B, T), generator=g), lengths=lengths)
        for _ in range(steps):
            logits = s.forward(logits[:, -1].float().argmax(-1, keepdim=True))
        if chunk:
            s.forward(torch.randint(0, cfg["vocab_size"], (B, chunk), generator=g))
    shape = {k: cfg[k] for k in ("hidden_size", "num_attention_heads", "head_dim", "n_routed_experts", "hc_mult",
                                 "sliding_window", "layer_types")}
    assert not problems, f"{dtype} {caches} B={B} T={T} lengths={lengths} {shape}:\n" + "\n".join(problems[:8])
