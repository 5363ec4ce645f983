"""What speculative decoding gives at a real acceptance: fit the MTP block on the main model's own greedy
outputs for a few minutes, then measure end-to-end decode tokens/s with and without speculation.

    python benchmarks/mtp_fit.py [--config 478m|quick|FILE.json] [--minutes 3] [--json out.json] [--quick]

A random checkpoint of the config (``bench_configs.py``; default the 478M-parameter model) is compiled
(``--dtype``, bf16 by default); v4c decodes greedy continuations of random prompts and gives the main
model's streams before its head at every position. The MTP block (``tests/mtp_reference.py``: transformers' V4 decoder layer between the
block's input combination and its own head, the embedding and LM head frozen), started from the main
model's last layer and head, learns entry p -> the token at p + 2 by cross-entropy with Adam, on CPU, for
``--minutes``; its top-1 on held-out continuations is what acceptance follows. Its weights replace the
checkpoint's MTP block (``mtp.0.*``, the graph's names), the checkpoint is compiled again and, at batch 1,
plain greedy decoding and speculative decoding with k = 1, 2, 3 are timed (the tokens must be identical)
with the acceptance they reach: on prompts the block was fitted on (a known, high acceptance: a random
model's continuations have nothing a block learns in minutes that carries to other prompts) and on
held-out prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bench_configs import describe, load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the MTP reference module (trainable)


def compile_checkpoint(cfg: dict, ckpt: Path, art: Path, dtype: str, tensors: dict | None = None) -> Path:
    """Write (or rewrite, with ``tensors`` as its MTP block) the random checkpoint, compile it into ``art``."""
    import shutil

    import v4c
    from v4c.io.safetensors import write_safetensors
    from v4c.model.random_weights import write_random_checkpoint
    if tensors is None:
        write_random_checkpoint(cfg, ckpt, seed=0, dtype=dtype, mtp=True)
    else:
        from safetensors.torch import load_file
        dt = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
        old = load_file(ckpt / "model.safetensors")
        new = {n: t for n, t in old.items() if not n.startswith("mtp.")}
        new.update({n: (t.to(dt) if t.is_floating_point() and t.dim() >= 2 else t) for n, t in tensors.items()})
        write_safetensors(ckpt / "model.safetensors", new)
    shutil.rmtree(art, ignore_errors=True)
    return v4c.compile(ckpt, art, target="cpu", dtype=dtype, weights="reference")


@torch.inference_mode()
def greedy_data(model, seqs: int, prompt: int, new: int, seed: int):
    """Greedy continuations of random prompts [S, prompt + new], and the main model's streams at every
    position but the last [S, prompt + new - 1, n, D] (float32)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (seqs, prompt), generator=gen)
    # one prompt at a time, as they are measured: in bf16 a batch's rounding may take another greedy path
    tokens = torch.cat([model.generate(p[None], new) for p in ids])
    s = model.new_session(seqs, tokens.shape[1])
    s.forward(tokens[:, :-1])
    return tokens, s.stream.float()


def init_from_last_layer(ref, ckpt: Path, layers: int) -> None:
    """Start from the main model's own last layer, head and final norm (as EAGLE-style drafters do), the
    embedding taken as it comes (e_proj = identity) and the streams not yet (h_proj = 0): the block begins
    as a one-layer model of the next token."""
    from safetensors.torch import load_file
    main = load_file(ckpt / "model.safetensors")
    sd = ref.state_dict()
    for k, t in sd.items():
        src = {"norm.weight": "model.norm.weight"}.get(k) or (f"model.{k}" if k.startswith("hc_head.") else
                                                              f"model.layers.{layers - 1}.{k[len('layer.'):]}")
        if src in main and main[src].shape == t.shape:
            sd[k] = main[src].float()
    sd["e_proj.weight"] = torch.eye(sd["e_proj.weight"].shape[0])
    sd["h_proj.weight"] = torch.zeros_like(sd["h_proj.weight"])
    sd["enorm.weight"], sd["hnorm.weight"] = torch.ones_like(sd["enorm.weight"]), torch.ones_like(sd["hnorm.weight"])
    ref.load_state_dict(sd)


def fit(ref, data, held, embed, head, prompt: int, seconds: float, batch: int, lr: float) -> list[dict]:
    """Adam on entry p -> token p + 2, the loss over targets in the greedy part only (a random prompt
    token cannot be predicted); returns the curve: training loss and top-1, and top-1 on held-out
    sequences (what acceptance follows)."""
    opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)

    def split(tokens, streams):
        t = tokens[:, 2:]
        return streams[:, :-1], tokens[:, 1:-1], t, torch.arange(t.shape[1]) + 2 >= prompt + 1

    hidden, nxt, target, mask = split(*data)

    @torch.no_grad()
    def held_top1():
        ref.eval()
        h, x, t, m = split(*held)
        logits, _ = ref(h, x, embed, head)
        ref.train()
        return (logits[:, m].argmax(-1) == t[:, m]).float().mean().item()

    ref.train()
    curve, t0, step = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        pick = torch.randint(0, hidden.shape[0], (batch,), generator=gen)
        logits, _ = ref(hidden[pick], nxt[pick], embed, head)
        loss = torch.nn.functional.cross_entropy(logits[:, mask].flatten(0, 1), target[pick][:, mask].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            acc = (logits[:, mask].argmax(-1) == target[pick][:, mask]).float().mean().item()
            curve.append({"step": step, "seconds": time.perf_counter() - t0, "loss": loss.item(), "top1": acc,
                          "held_out_top1": held_top1()})
            print(f"  step {step}: loss {loss.item():.3f}, top-1 {acc:.2f}, held-out top-1 "
                  f"{curve[-1]['held_out_top1']:.2f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        step += 1
    ref.eval()
    curve.append({"step": step, "seconds": time.perf_counter() - t0, "held_out_top1": held_top1()})
    return curve


@torch.inference_mode()
def timed_decode(model, prompts: torch.Tensor, new: int) -> dict:
    """Plain and speculative (k = 1, 2, 3) greedy decoding of each prompt alone: tokens/s and acceptance. The
    modes take turns prompt by prompt, so that a drift of the machine reaches all of them."""
    modes = (0, 1, 2, 3)  # 0: plain decoding
    secs = dict.fromkeys(modes, 0.0)
    hist = {k: [0] * (k + 1) for k in modes[1:]}
    same = dict.fromkeys(modes[1:], True)
    model.generate(prompts[:1], 4, speculative="mtp")  # first calls of each shape: not timed
    for p in prompts:
        for k in modes:
            t0 = time.perf_counter()
            out = model.generate(p[None], new, **({"speculative": "mtp", "draft_tokens": k} if k else {}))
            secs[k] += time.perf_counter() - t0
            if k == 0:
                want = out
            else:
                same[k] &= torch.equal(out.tokens, want)
                hist[k] = [a + b for a, b in zip(hist[k], out.stats.histogram)]
    rate = {k: len(prompts) * new / secs[k] for k in modes}
    rows = []
    for k in modes[1:]:
        mean = sum(a * n for a, n in enumerate(hist[k])) / sum(hist[k])
        rows.append({"k": k, "tokens_per_s": rate[k], "histogram": hist[k], "mean_accepted": mean,
                     "tokens_per_step": mean + 1, "same_tokens": same[k], "speedup": rate[k] / rate[0]})
    return {"plain": {"tokens_per_s": rate[0]}, "speculative": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help=f"a preset or a JSON file (default 478m; quick with --quick). "
                                                   f"{describe()}")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16", help="the measured artifact's dtype")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time (default 3)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a short run (and, without --config, a small model)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    import v4c
    from mtp_reference import make_mtp_reference, mtp_tensors

    name, cfg = load_config(a.config or ("quick" if a.quick else "478m"))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="v4c-mtp-fit-"))
    seqs, prompt, new, test_prompts, test_new = (8, 16, 48, 2, 32) if a.quick else (32, 32, 224, 4, 128)
    print(f"{name}: checkpoint and artifacts in {work}", file=sys.stderr)
    art = compile_checkpoint(cfg, work / "ckpt", work / "art", a.dtype)
    model = v4c.load(art, device="cpu")
    t0 = time.perf_counter()
    data = greedy_data(model, seqs, prompt, new, seed=1)
    held = greedy_data(model, max(seqs // 4, 2), prompt, new, seed=2)
    data_s = time.perf_counter() - t0
    print(f"training data: {seqs} greedy continuations of {new} tokens ({data_s:.0f}s)", file=sys.stderr)
    embed = model.executor.params["model.embed_tokens.weight"].float()
    head = model.executor.params["lm_head.weight"].float()
    ref = make_mtp_reference(cfg, seed=0)
    ref.config._experts_implementation = "grouped_mm"  # trains several times faster than the eager loop
    init_from_last_layer(ref, work / "ckpt", cfg["num_hidden_layers"])
    curve = fit(ref, data, held, embed, head, prompt, a.minutes * 60, batch=4 if a.quick else 8, lr=1e-3)
    art = compile_checkpoint(cfg, work / "ckpt", work / "art-fitted", a.dtype,
                             {n: t.detach() for n, t in mtp_tensors(ref).items()})
    model = v4c.load(art, device="cpu")
    decode = {"fitted_prompts": timed_decode(model, data[0][:test_prompts, :prompt], test_new),
              "held_out_prompts": timed_decode(model, held[0][:test_prompts, :prompt], test_new)}
    res = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/mtp_fit.py", *sys.argv[1:]]),
           "config": name, "dtype": a.dtype, "quick": a.quick, "training": {
               "sequences": seqs, "prompt": prompt, "greedy_tokens": new, "data_seconds": data_s,
               "minutes": a.minutes, "steps": curve[-1]["step"], "held_out_top1": curve[-1]["held_out_top1"],
               "curve": curve},
           "decode": {"prompts": test_prompts, "new_tokens": test_new, **decode}}
    print(summary(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


def summary(res: dict) -> str:
    lines = [f"training: {res['training']['steps']} steps in {res['training']['minutes']:g} min, held-out top-1 "
             f"{res['training']['held_out_top1']:.2f}"]
    for label in ("fitted_prompts", "held_out_prompts"):
        rows = res["decode"][label]
        lines.append(f"{res['config']} {res['dtype']}, {label.replace('_', ' ')}: plain "
                     f"{rows['plain']['tokens_per_s']:.1f} tok/s")
        lines += [f"  k={r['k']}: {r['tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x), {r['tokens_per_step']:.2f} "
                  f"tokens per step (histogram {r['histogram']}), tokens {'identical' if r['same_tokens'] else 'DIFFER'}"
                  for r in rows["speculative"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
