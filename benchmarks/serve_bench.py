"""`v4c serve` against transformers' own OpenAI-compatible server, on one CPU, one checkpoint, one client.

The bf16 checkpoint of `benchmarks/cpu_vs_hf.py` (478M parameters; `--quick`: its small sibling) is
written at run time with the tests' tokenizer (`tests/serve_tokenizer.py`); v4c compiles it. Each server
runs as its own process, one after the other, and is driven by the same asyncio client: random prompts of
`--input-len` tokens (text that the tokenizer encodes to exactly that many tokens: transformers' server
takes text prompts only), greedy, `--output-len` tokens each, streamed, at each concurrency of
`--concurrency`. Reported per server and concurrency, as `vllm bench serve` names them: request
throughput, output tokens/s, time to first token and time per output token (mean, p50, p99), end to end.

transformers serve is run without `--continuous-batching`: its paged cache does not know V4's compressed
layers ("Invalid layer type: compressed_sparse_attention" in transformers 5.25), so it serves one
request at a time. That is what a user of it gets for V4 today; the README says so.

    python benchmarks/serve_bench.py [--quick] [--json out.json] [--plot out.png] [--engines v4c,transformers]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path, quick: bool) -> tuple[Path, Path]:
    """The bf16 checkpoint (with the test tokenizer) and v4c's artifact of it, made once in ``work``."""
    import v4c
    from bench_configs import load_config
    from serve_tokenizer import write_test_tokenizer
    from v4c.model.random_weights import write_random_checkpoint
    ckpt, art = work / "ckpt", work / "art"
    if not (ckpt / "model.safetensors").exists():
        cfg = load_config("quick" if quick else "478m")[1]
        print(f"writing a random bf16 checkpoint to {ckpt}", file=sys.stderr)
        write_random_checkpoint(cfg, ckpt, seed=0, dtype="bf16")
        # transformers' server finds the model class from these (its from_pretrained path is AutoModel's)
        hf_cfg = json.loads((ckpt / "config.json").read_text())
        hf_cfg.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], torch_dtype="bfloat16")
        (ckpt / "config.json").write_text(json.dumps(hf_cfg, indent=1) + "\n")
        write_test_tokenizer(ckpt, cfg["vocab_size"])
    if not art.exists():
        v4c.compile(ckpt, art, target="cpu", dtype="bf16", weights="reference")
    return ckpt, art


def make_prompts(ckpt: Path, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` random texts that the checkpoint's tokenizer encodes to exactly ``length`` tokens each."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    rng = random.Random(seed)
    words = ["the", "weather", "paris", "tool", "answer", "city", "days", "step", "final", "short", "capital",
             "rain", "light", "evening", "number", "question", "seven", "eight", "nine", "ten"]
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words) + rng.choice(["", ",", "."]) for _ in range(length * 2))
        ids = tok.encode(text, add_special_tokens=False).ids[:length]
        for _ in range(20):  # decoding then encoding a cut can merge across the cut: trim until it holds
            text = tok.decode(ids)
            got = tok.encode(text, add_special_tokens=False).ids
            if len(got) == length:
                break
            ids = got[:length] if len(got) > length else got + tok.encode(" the", add_special_tokens=False).ids
        else:
            raise RuntimeError(f"could not make a prompt of exactly {length} tokens")
        out.append(text)
    return out


# ---- the servers ---------------------------------------------------------------------------------

def start_server(engine: str, ckpt: Path, art: Path, port: int, max_batch: int, max_context: int,
                 step_tokens: int, log: Path) -> subprocess.Popen:
    if engine == "v4c":
        cmd = [sys.executable, "-m", "v4c.cli", "serve", str(art), "--port", str(port), "--max-batch",
               str(max_batch), "--max-context", str(max_context), "--step-tokens", str(step_tokens),
               "--log-level", "warning", "--served-model-name", "bench"]
    else:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", str(ckpt), "--port", str(port), "--device", "cpu", "--dtype", "bfloat16",
               "--log-level", "warning", "--max-model-len", str(max_context)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(p: subprocess.Popen, base: str, log: Path, timeout: float = 600) -> str:
    """Waits for /health; returns the model id /v1/models lists."""
    import httpx
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as c:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"the server exited ({p.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if (await c.get(f"{base}/health")).status_code == 200:
                    models = (await c.get(f"{base}/v1/models")).json()["data"]
                    return models[0]["id"] if models else ""
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            await asyncio.sleep(0.5)


def stop_server(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


# ---- the client ------------------------------------------------------------------------------------

async def one_request(client, base: str, model: str, prompt: str, output_len: int) -> dict:
    """One streamed greedy completion: when its first and last tokens came, and how many."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            if any(ch.get("text") for ch in ev.get("choices", ())):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    out = usage["completion_tokens"] if usage and usage.get("completion_tokens") else chunks
    ttft = (first or end) - t0
    return {"ttft": ttft, "e2e": end - t0, "output_tokens": out,
            "tpot": (end - (first or end)) / (out - 1) if out > 1 else None, "counted_from": "usage" if usage
            else "chunks"}


async def run_level(base: str, model: str, prompts: list[str], concurrency: int, output_len: int) -> dict:
    """Every prompt once, ``concurrency`` in flight at a time."""
    import httpx
    queue = list(prompts)
    results = []

    async def worker(client):
        while queue:
            results.append(await one_request(client, base, model, queue.pop(0), output_len))

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(results: list[dict], wall: float, concurrency: int) -> dict:
    out_tokens = sum(r["output_tokens"] for r in results)
    row = {"concurrency": concurrency, "requests": len(results), "duration_s": wall,
           "request_throughput": len(results) / wall, "output_tokens_per_s": out_tokens / wall,
           "output_tokens": out_tokens}
    for key in ("ttft", "tpot", "e2e"):
        xs = [r[key] * 1000 for r in results if r[key] is not None]
        if xs:
            row[f"{key}_ms"] = {"mean": statistics.fmean(xs), "p50": _pct(xs, 50), "p99": _pct(xs, 99)}
    return row


# ---- the run ------------------------------------------------------------------------------------------

def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine, rows in result["engines"].items():
        ax.plot([r["concurrency"] for r in rows], [r["output_tokens_per_s"] for r in rows], marker="o",
                label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{result['model']['params'] / 1e6:.0f}M bf16, {result['input_len']} in / "
                 f"{result['output_len']} out, {result['machine']['cpus']} CPU cores")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small model, short prompts (a smoke run)")
    ap.add_argument("--engines", default="v4c,transformers")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 512; --quick 64)")
    ap.add_argument("--output-len", type=int, default=None, help="generated tokens (default 128; --quick 16)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per concurrency level (default: max(2, concurrency), times 2 for v4c)")
    ap.add_argument("--max-batch", type=int, default=16, help="v4c serve --max-batch")
    ap.add_argument("--step-tokens", type=int, default=256, help="v4c serve --step-tokens")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and artifact here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    input_len = a.input_len or (64 if a.quick else 512)
    output_len = a.output_len or (16 if a.quick else 128)
    levels = [int(c) for c in a.concurrency.split(",")]
    engines = a.engines.split(",")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="v4c-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, art = prepare(work, a.quick)
    from v4c.inspect import inspect_artifact
    info = inspect_artifact(art, context=input_len + output_len)
    max_context = input_len + output_len + 64
    result = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/serve_bench.py", *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "model": {"params": info["params"], "dtype": "bf16"}, "input_len": input_len, "output_len": output_len,
              "v4c_serve": {"max_batch": a.max_batch, "step_tokens": a.step_tokens, "max_context": max_context},
              "transformers_serve": "without --continuous-batching (its paged cache rejects V4's compressed layers)",
              "engines": {}}
    import transformers
    import torch
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    for engine in engines:
        port = _port()
        log = work / f"{engine}.log"
        p = start_server(engine, ckpt, art, port, a.max_batch, max_context, a.step_tokens, log)
        base = f"http://127.0.0.1:{port}"
        rows = []
        try:
            model = asyncio.run(wait_ready(p, base, log))
            # one warm-up request: the first call's one-time costs (kernel builds, allocations) are not serving
            asyncio.run(run_level(base, model, make_prompts(ckpt, 1, input_len, seed=99), 1, 4))
            for c in levels:
                n = a.requests or max(2, c) * (2 if engine == "v4c" else 1)
                row = asyncio.run(run_level(base, model, make_prompts(ckpt, n, input_len, seed=c), c, output_len))
                rows.append(row)
                print(f"{engine:12s} c={c:3d}: {row['output_tokens_per_s']:7.1f} out tok/s, "
                      f"{row['request_throughput']:.3f} req/s, TTFT p50 {row['ttft_ms']['p50']:.0f} ms p99 "
                      f"{row['ttft_ms']['p99']:.0f} ms, TPOT p50 {row.get('tpot_ms', {}).get('p50', float('nan')):.1f} ms",
                      file=sys.stderr, flush=True)
        finally:
            stop_server(p)
        result["engines"][engine] = rows
    if "v4c" in result["engines"] and "transformers" in result["engines"]:
        hf = {r["concurrency"]: r for r in result["engines"]["transformers"]}
        result["speedup"] = {str(r["concurrency"]): r["output_tokens_per_s"] / hf[r["concurrency"]]["output_tokens_per_s"]
                             for r in result["engines"]["v4c"] if r["concurrency"] in hf}
    if "v4c" in result["engines"]:
        own = {r["concurrency"]: r["output_tokens_per_s"] for r in result["engines"]["v4c"]}
        if 1 in own:
            result["v4c_scaling_vs_c1"] = {str(c): v / own[1] for c, v in own.items()}
    text = json.dumps(result, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    if a.plot:
        plot(result, a.plot)
    print(text)


if __name__ == "__main__":
    main()
