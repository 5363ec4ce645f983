"""Context caching (the prefix cache of `v4c serve`) on one CPU: what a cached prefix saves.

The bf16 random checkpoint of `benchmarks/cpu_vs_hf.py` (478M parameters; `--quick`: its small
sibling) is written at run time and compiled. Each phase runs the serving engine (`v4c.serve.Engine`,
what `v4c serve` runs; default step size) in a fresh child process, so a "restart" is a new process
that finds only the disk tier's files:

1. **Long prefix, cold vs warm**: a prefix of `--prefix` tokens (8,192) and a 32-token question. Time to
   first token of: the prompt without a cache; the same with the cache on (cold: it stores as it goes);
   another question after the same prefix (warm, from memory); then, in a new process, a third
   question (warm, from the disk tier after a restart).
2. **A conversation**: `--turns` turns (10), each the whole conversation so far plus a new user message,
   growing to `--conversation` tokens (16K), each answer `--answer` tokens generated (greedy): total time
   with the cache against without.
3. **Hit rates**: for prompts of 300, 1,000 and 5,000 tokens, a second request sharing all but the
   last 32 tokens: the cached tokens and hit rate, next to what 4,096-token blocks (vLLM-style) could
   reuse.
4. **Bytes**: the snapshot bytes per token (`v4c inspect --json`'s `context_cache`, and what the memory
   tier held after the prefix) against `kv_cache.bytes_per_token`.

    python benchmarks/context_cache_bench.py [--quick] [--config 478m|FILE.json] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

from bench_configs import load_config

QUESTION = 32
# sizes: (the full run's, --quick's)
SIZES = {"prefix": (8192, 1024), "turns": (10, 4), "conversation": (16384, 2048), "answer": (64, 16),
         "context": (17408, 4096), "memory_bytes": (4 << 30, 4 << 30)}


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    import torch
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the child process: one engine ----------------------------------------------------------------

def _engine(a, cache_on: bool):
    import v4c
    from v4c.runtime.prefix_cache import PrefixCache
    from v4c.serve import Engine
    model = v4c.load(a.art)
    cache = (PrefixCache.for_model(model, memory_bytes=a.memory_bytes, disk_dir=a.cache_dir)
             if cache_on else None)
    return model, cache, Engine(model, max_batch=2, max_context=a.context, prefix_cache=cache)


def _first_token(engine, prompt, max_tokens: int = 1):
    """(seconds to the first token, the Completion)."""
    from v4c.serve import SamplingParams, TokenEvent
    t0 = time.perf_counter()
    h = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    ttft = None
    for ev in h.events():
        if ttft is None and isinstance(ev, TokenEvent):
            ttft = time.perf_counter() - t0
    return ttft, h.result()


def _worker(a) -> dict:
    model, cache, engine = _engine(a, a.task != "nocache" and a.task != "turns-nocache")
    vocab = model.config.vocab_size
    prefix = _tokens(a.prefix, 1, vocab)
    out: dict = {"task": a.task}
    with engine:
        _first_token(engine, _tokens(64, 99, vocab))  # warm-up: lazy inits, first touch of the weights
        if cache is not None:
            cache.flush()
        if a.task in ("nocache", "prefix"):
            t, c = _first_token(engine, prefix + _tokens(QUESTION, 2, vocab))
            out["cold"] = {"ttft_s": t, "cached_tokens": c.cached_tokens}
        if a.task == "prefix":
            cache.flush()  # (the disk writes would otherwise share the CPU with the warm request)
            t, c = _first_token(engine, prefix + _tokens(QUESTION, 3, vocab))
            out["warm_memory"] = {"ttft_s": t, "cached_tokens": c.cached_tokens}
            out["memory_bytes_after"] = cache.stats()["memory"]["bytes"]
        if a.task == "restart":
            t, c = _first_token(engine, prefix + _tokens(QUESTION, 4, vocab))
            out["warm_disk"] = {"ttft_s": t, "cached_tokens": c.cached_tokens, "disk": cache.stats()["disk"]}
        if a.task.startswith("turns"):
            out["turns"] = _conversation(a, engine, vocab)
        if a.task == "hits":
            out["hits"] = []
            for n in (300, 1000, 5000):
                if n + QUESTION > a.context:
                    continue
                p = _tokens(n, 10 + n, vocab)
                _first_token(engine, p)
                t, c = _first_token(engine, p[:n - QUESTION] + _tokens(QUESTION, 20 + n, vocab))
                out["hits"].append({"prompt_tokens": n, "cached_tokens": c.cached_tokens, "hit_rate":
                                    c.cached_tokens / n, "ttft_s": t,
                                    "blocks_4096_cached_tokens": (n - QUESTION) // 4096 * 4096})
    if cache is not None:
        out["cache"] = cache.stats()
        cache.close()
    return out


def _conversation(a, engine, vocab: int) -> dict:
    user = (a.conversation - a.turns * a.answer) // a.turns
    convo: list[int] = []
    rows = []
    t0 = time.perf_counter()
    for i in range(a.turns):
        convo = convo + _tokens(user, 100 + i, vocab)
        ttft, c = _first_token(engine, convo, a.answer)
        rows.append({"turn": i + 1, "prompt_tokens": len(convo), "cached_tokens": c.cached_tokens, "ttft_s": ttft})
        convo = convo + c.tokens
    return {"total_s": time.perf_counter() - t0, "final_tokens": len(convo), "per_turn": rows}


def child(job: dict, **kw) -> dict:
    """One phase in a fresh process (its job as one JSON argument); what it printed last, parsed."""
    job = {**job, **kw}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the {job['task']} phase failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the parent -------------------------------------------------------------------------------------

def prepare(cfg: dict, work: Path) -> Path:
    import v4c
    from v4c.model.random_weights import write_random_checkpoint
    ckpt, art = work / "ckpt", work / "art"
    if not (ckpt / "model.safetensors").exists() or json.loads((ckpt / "config.json").read_text()) != cfg:
        print(f"writing a random bf16 checkpoint to {ckpt}", file=sys.stderr)
        write_random_checkpoint(cfg, ckpt, seed=0, dtype="bf16")
        shutil.rmtree(art, ignore_errors=True)
    if not art.exists():
        v4c.compile(ckpt, art, target="cpu", dtype="bf16", weights="reference")
    return art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="a preset of bench_configs.py or a JSON file (default 478m)")
    ap.add_argument("--quick", action="store_true", help="a small model and short prompts (a smoke run)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and artifact here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a child: its job, as JSON
    for k, (full, quick) in SIZES.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"(default {full}; --quick {quick})")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(SimpleNamespace(**json.loads(a.worker)))))
        return
    for k, (full, quick) in SIZES.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    name, cfg = load_config(a.config or ("quick" if a.quick else "478m"))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="v4c-ccbench-"))
    art = prepare(cfg, work)
    cache_dir = work / "context-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    job = {"art": str(art), "cache_dir": None, **{k: getattr(a, k) for k in SIZES}}
    from v4c.inspect import inspect_artifact
    info = inspect_artifact(art, context=a.prefix)
    res = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/context_cache_bench.py",
                                                           *sys.argv[1:]]),
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
           "config": name, "params": info["params"], "sizes": {k: getattr(a, k) for k in SIZES}}
    print("prefix: without a cache, cold, warm from memory ...", file=sys.stderr)
    res["nocache"] = child(job, task="nocache")
    res["prefix"] = child(job, task="prefix", cache_dir=str(cache_dir))
    print("... and warm from disk after a restart", file=sys.stderr)
    res["restart"] = child(job, task="restart", cache_dir=str(cache_dir))
    print("conversation without and with the cache", file=sys.stderr)
    res["turns_nocache"] = child(job, task="turns-nocache")["turns"]
    res["turns_cache"] = child(job, task="turns")["turns"]
    print("hit rates", file=sys.stderr)
    res["hits"] = child(job, task="hits")["hits"]
    cc, kv = info["context_cache"], info["kv_cache"]
    res["bytes"] = {"kv_bytes_per_token": kv["bytes_per_token"], "snapshot_bytes_per_token": cc["bytes_per_token"],
                    "block_bytes": cc["block_bytes"], "boundary_state_bytes": cc["boundary_state_bytes"],
                    "memory_tier_bytes_per_prefix_token": res["prefix"]["memory_bytes_after"] / a.prefix}
    cold, warm, disk = (res["nocache"]["cold"]["ttft_s"], res["prefix"]["warm_memory"]["ttft_s"],
                        res["restart"]["warm_disk"]["ttft_s"])
    res["summary"] = {"ttft_cold_s": cold, "ttft_cold_cache_on_s": res["prefix"]["cold"]["ttft_s"],
                      "ttft_warm_memory_s": warm, "ttft_warm_disk_s": disk, "speedup_memory": cold / warm,
                      "speedup_disk": cold / disk, "conversation_s_without": res["turns_nocache"]["total_s"],
                      "conversation_s_with": res["turns_cache"]["total_s"],
                      "conversation_speedup": res["turns_nocache"]["total_s"] / res["turns_cache"]["total_s"]}
    for k, v in res["summary"].items():
        print(f"{k:28s} {v:.3f}")
    for h in res["hits"]:
        print(f"prompt {h['prompt_tokens']:5d}: cached {h['cached_tokens']:5d} ({h['hit_rate']:.0%}); "
              f"4096-token blocks: {h['blocks_4096_cached_tokens']}")
    b = res["bytes"]
    print(f"snapshot bytes/token {b['snapshot_bytes_per_token']:.1f} (memory tier: "
          f"{b['memory_tier_bytes_per_prefix_token']:.1f}) vs kv_cache.bytes_per_token {b['kv_bytes_per_token']:.1f}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
