"""What speculative decoding's mechanism costs on a CPU: one verify step of k + 1 tokens against one plain
decode step, k = 1..3, with the weight bytes each must stream.

    python benchmarks/mtp_bench.py [--config 478m|quick|FILE.json] [--dtype bf16|f32] [--json out.json] [--quick]

A random checkpoint of the config (``bench_configs.py``; default the 478M-parameter model of
``cpu_vs_hf.py``) with an MTP block is written and compiled; after a prompt, it times plain decode steps
(T = 1) and verify steps (T = k + 1 tokens, then the rewind that keeps one of them, so both advance the
sequence by one token), the rewind alone, and the MTP block's k drafts. Random weights accept almost
nothing, so this measures the mechanism's cost; ``mtp_fit.py`` measures what it gives at a real acceptance.

In an MoE the k + 1 tokens of a verify step hit more distinct experts than one token does. Per step the
script counts the distinct routed experts hit (over all MoE layers, from the router's own choices) and
the *floor*: the bytes of every weight the step reads at least once (every non-expert weight, the
embedding rows of its tokens, each distinct expert's matrices once), streamed at the machine's copy
bandwidth. ``over_floor`` = measured time / floor time (goal: within 1.3x for the verify steps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bench_configs import describe, load_config
from cpu_vs_hf import machine


def artifact_with_mtp(cfg: dict, work: Path, dtype: str) -> Path:
    """The compiled artifact of ``cfg`` with a random MTP block under ``work``, reused when it is there."""
    import v4c
    from v4c.model.random_weights import write_random_checkpoint
    ckpt, art = work / f"mtp-{dtype}" / "ckpt", work / f"mtp-{dtype}" / "art"
    if not (ckpt / "model.safetensors").exists() or json.loads((ckpt / "config.json").read_text()) != cfg:
        write_random_checkpoint(cfg, ckpt, seed=0, dtype=dtype, mtp=True)
        import shutil
        shutil.rmtree(art, ignore_errors=True)
    if not art.exists():
        v4c.compile(ckpt, art, target="cpu", dtype=dtype, weights="reference")
    return art


class RouterLog:
    """Records the experts every ``moe_router`` node picks, by wrapping its bound implementation (a benchmark
    looking inside the executor: the runtime has no hook for it)."""

    def __init__(self, executor):
        self.picked: list[torch.Tensor] = []
        self.executor, self.saved = executor, {p: list(v) for p, v in executor.plans.items()}
        for phase, plan in executor.plans.items():
            for i, (fn, ins, outs, attrs, state_io, name) in enumerate(plan):
                if name == "moe_router":
                    plan[i] = (self._wrap(fn), ins, outs, attrs, state_io, name)

    def _wrap(self, fn):
        def run(*args, **kw):
            res = fn(*args, **kw)
            self.picked.append(res[0].reshape(-1).clone())
            return res
        return run

    def close(self):
        self.executor.plans.update(self.saved)

    def distinct(self) -> int:
        """Distinct experts over every MoE layer of the calls recorded since the last ``distinct``."""
        n = sum(int(p.unique().numel()) for p in self.picked)
        self.picked = []
        return n


def floor_bytes(graph, tokens: int, distinct_experts: int, layers: int) -> int:
    """Weight bytes a call of ``tokens`` tokens reads at least once: every weight, the embedding rows of its
    tokens, and of the routed experts only the distinct ones hit (``distinct_experts`` over ``layers``)."""
    total, per_expert = 0, 0
    for name, t in graph.params:
        n = t.nbytes()
        if name == "model.embed_tokens.weight":
            n = n // t.shape[0] * tokens
        elif ".mlp.experts." in name and t.rank == 3:  # its scale (when quantised) is rank 3 too
            per_expert += n // t.shape[0]
            continue
        total += n
    return total + distinct_experts * per_expert // layers


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def measure(art: Path, prompt: int, steps: int, copy_gb_s: float) -> dict:
    import v4c
    from v4c.runtime.speculative import MTPDrafter
    model = v4c.load(art, device="cpu")
    graph = model.graph
    layers = sum(1 for n in graph.nodes if n.op == "moe_router")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ctx = prompt + 4 * (3 * steps + 1) + 8  # every step of the 4 rows below advances one token; a verify 4 more
    out = {"prompt": prompt, "steps": steps, "moe_layers": layers}

    def tokens(t):
        return torch.randint(0, vocab, (1, t), generator=gen)

    with torch.inference_mode():
        s = model.new_session(1, ctx)
        s.forward(tokens(prompt))

        def plain():
            s.forward(tokens(1))

        def verify(k):
            point = s.rewind_point([k + 1])
            s.forward(tokens(k + 1))
            return point

        rows = []
        for k in (0, 1, 2, 3):  # k = 0: the plain decode step
            step = plain if k == 0 else (lambda k=k: s.rewind(verify(k), [1]))
            step()  # the first call of a shape is not timed
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            log = RouterLog(model.executor)
            experts = []
            for _ in range(steps):
                step()
                experts.append(log.distinct())
            log.close()
            row = {"k": k, "tokens": k + 1, "ms_per_step": median_ms(times),
                   "distinct_experts_per_step": statistics.mean(experts)}
            fb = floor_bytes(graph, k + 1, row["distinct_experts_per_step"], layers)
            row.update(floor_bytes=fb, floor_ms=fb / (copy_gb_s * 1e9) * 1e3)
            row["over_floor"] = row["ms_per_step"] / row["floor_ms"]
            if k:
                parts = {"forward": [], "rewind": []}
                for _ in range(steps):
                    t0 = time.perf_counter()
                    point = verify(k)
                    t1 = time.perf_counter()
                    s.rewind(point, [1])
                    parts["forward"].append(t1 - t0)
                    parts["rewind"].append(time.perf_counter() - t1)
                row["forward_ms"], row["rewind_ms"] = median_ms(parts["forward"]), median_ms(parts["rewind"])
                drafter = MTPDrafter(model, 1, ctx)
                one = torch.ones(1, dtype=torch.int64)
                times = []
                for i in range(steps + 1):
                    drafter.feed(s.stream[:, :1], tokens(1), one)
                    t0 = time.perf_counter()
                    drafter.draft(k, 0.0, 1.0, None, one)
                    if i:  # the first is not timed
                        times.append(time.perf_counter() - t0)
                row["draft_ms"] = median_ms(times)
            rows.append(row)
            print(f"  k={k}: {row['ms_per_step']:.2f} ms/step, {row['distinct_experts_per_step']:.1f} distinct experts, "
                  f"{row['over_floor']:.2f}x the floor ({row['floor_ms']:.2f} ms)"
                  + (f"; draft {row['draft_ms']:.2f} ms, rewind {row['rewind_ms']:.2f} ms" if k else ""),
                  file=sys.stderr)
    base = rows[0]["ms_per_step"]
    for r in rows[1:]:
        r["verify_over_decode"] = r["ms_per_step"] / base
        step = r["draft_ms"] + r["ms_per_step"]  # a whole speculative step: drafts, then verify + rewind
        r["speculative_step_over_decode"] = step / base
        # tokens a step must give (the acceptance length) for speculation to be 1.4x plain decoding
        r["acceptance_length_for_1_4x"] = 1.4 * step / base
    out["decode"], out["verify"] = rows[0], rows[1:]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help=f"a preset or a JSON file (default 478m; quick with --quick). "
                                                   f"{describe()}")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a short run (and, without --config, a small model)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and artifact here")
    a = ap.parse_args()
    name, cfg = load_config(a.config or ("quick" if a.quick else "478m"))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="v4c-mtp-bench-"))
    mach = machine()
    print(f"{name} {a.dtype}: compiling in {work}", file=sys.stderr)
    art = artifact_with_mtp(cfg, work, a.dtype)
    prompt, steps = (128, 8) if a.quick else (2048, 32)
    res = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/mtp_bench.py", *sys.argv[1:]]),
           "machine": mach, "config": name, "dtype": a.dtype, "quick": a.quick,
           **measure(art, prompt, steps, mach["copy_gb_per_s"])}
    d = res["decode"]
    print(f"{name} {a.dtype}, prompt {prompt}: decode {d['ms_per_step']:.2f} ms/step, {d['over_floor']:.2f}x its floor "
          f"({d['distinct_experts_per_step']:.0f} experts)")
    for r in res["verify"]:
        print(f"  verify k={r['k']}: {r['ms_per_step']:.2f} ms ({r['verify_over_decode']:.2f}x a decode step; "
              f"rewind {r['rewind_ms']:.2f} ms), {r['distinct_experts_per_step']:.1f} distinct experts, "
              f"{r['over_floor']:.2f}x the union's floor; drafts {r['draft_ms']:.2f} ms; a step is "
              f"{r['speculative_step_over_decode']:.2f}x a decode step: 1.4x needs {r['acceptance_length_for_1_4x']:.2f} "
              f"tokens per step")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
