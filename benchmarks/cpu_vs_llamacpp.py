"""v4c's cpu backend against llama.cpp on the same CPU, checkpoint, prompts and thread count.

llama.cpp is the CPU engine people compare against, and it runs DeepSeek-V4 (its `deepseek4`
architecture: compressed attention, indexer, mHC, hash routing). This script:

1. gets llama.cpp's sources from the `llama-cpp-python` source package (`pip download --no-binary`,
   the sources that package builds from; `--llama-cpp DIR` takes a checkout instead) and builds its
   `llama-bench` with CMake (`GGML_NATIVE=ON`: this CPU's instruction sets), once per directory;
2. writes a checkpoint of `benchmarks/bench_configs.py` (a preset, or a JSON file: `--config`) in the
   official release's tensor naming and hub config: routed experts MXFP4 as released (the converter
   accepts no other expert format), every other matrix unquantised (`--dtype`, bf16 by default), with
   the tests' tokenizer; both engines run this one checkpoint;
3. converts it with llama.cpp's own `convert_hf_to_gguf.py` to a GGUF of the same dtype. The test
   tokenizer's pre-tokenizer is not in the converter's list of known hashes, so the converter is told
   it is DeepSeek-V3's (this decides only how text is split; both engines here run token ids);
4. runs `llama-bench` (prefill of 512 and 4,096 tokens; 128 decode steps after a 2,048-token context)
   and v4c on the same shapes through `cpu_vs_hf.py`'s child-process worker, each in a fresh process,
   alternating, with the same threads; prints and writes the tokens/s and the ratios.

If a step fails (the build, the conversion, or llama.cpp refusing the model), the result records which
step, the llama.cpp version and the message, and v4c's numbers alone.

    python benchmarks/cpu_vs_llamacpp.py [--config PRESET|FILE] [--dtype bf16|f32] [--threads N]
                                         [--llama-cpp DIR] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python source release whose vendored llama.cpp is built


class StepFailed(RuntimeError):
    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step, self.message = step, message


def _run(cmd, step: str, log: Path, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-12:]
        raise StepFailed(step, f"exit {r.returncode}: " + "\n".join(tail))
    return r


# ---- llama.cpp: sources and build ---------------------------------------------------------------

def llama_cpp_sources(cache: Path, version: str) -> Path:
    """The llama.cpp tree vendored in llama-cpp-python ``version``'s source package, fetched once."""
    root = cache / f"llama-cpp-python-{version}"
    src = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    root.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps", "--no-binary",
          ":all:", "-d", str(root)], "download", root / "download.log")
    (archive,) = root.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as t:
        t.extractall(root, filter="data")
    return src


def build_llama_bench(src: Path) -> Path:
    exe = src / "build" / "bin" / "llama-bench"
    if exe.exists():
        return exe
    log = src.parent.parent / "build.log"
    _run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
         "configure", log)
    _run(["cmake", "--build", str(src / "build"), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)],
         "build", log)
    return exe


def llama_cpp_version(src: Path, exe: Path) -> str:
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
        line = (out.stdout + out.stderr).strip().splitlines()
        return line[0] if line else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ---- the checkpoint, in the release's naming ------------------------------------------------------

def hub_config(cfg: dict) -> dict:
    """``cfg`` (HF spelling) plus the released hub config's keys the converter reads."""
    from v4c.model.config import V4Config
    c = V4Config.from_dict(cfg)
    d = c.to_dict()
    d.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", torch_dtype="bfloat16",
             compress_ratios=[c.layer_ratio(i) for i in range(c.num_hidden_layers)] + [0],
             num_hash_layers=c.n_hash_layers, num_nextn_predict_layers=0,
             compress_rope_theta=cfg.get("compress_rope_theta", 160000.0))
    if d.get("rope_parameters"):
        d["rope_scaling"] = dict(d["rope_parameters"], type="yarn")
    return d


def write_release_checkpoint(cfg: dict, directory: Path, dtype: str, seed: int = 0) -> Path:
    """Random weights of ``cfg`` in the release's tensor names: routed experts MXFP4 as released (llama.cpp's
    converter takes no other expert format), the other matrices unquantised in ``dtype`` (the release's
    FP8 ones the converter would widen anyway), its fp32 parameters fp32; with the tests' tokenizer."""
    import torch

    from official_names import official_name
    from serve_tokenizer import write_test_tokenizer
    from v4c.graph.weight_formats import quantize_mxfp4
    from v4c.io.safetensors import write_safetensors
    from v4c.model.build import build_graph
    from v4c.model.config import V4Config
    from v4c.model.random_weights import random_params
    c = V4Config.from_dict(cfg)
    params = random_params(build_graph(c, "f32"), c, seed)
    keep32 = ("sinks", "position_bias", "e_score_correction_bias", "hc_fn", "hc_base", "hc_scale", "_hc.fn",
              "_hc.base", "_hc.scale")
    want = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    out = {}
    for name, w in params.items():
        if not w.is_floating_point():
            t = w.to(torch.int64)
        else:
            t = w.float() if name.endswith(keep32) else w.to(want)
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            # routed experts as the release stores them (and llama.cpp's converter requires): MXFP4
            layer = name.split(".")[2]
            parts = ("w1", "w3") if name.endswith("gate_up_proj") else ("w2",)
            for e in range(w.shape[0]):
                for part, chunk in zip(parts, w[e].chunk(len(parts))):
                    data, scale = quantize_mxfp4(chunk.contiguous())
                    out[f"layers.{layer}.ffn.experts.{e}.{part}.weight"] = data
                    out[f"layers.{layer}.ffn.experts.{e}.{part}.scale"] = scale
        else:
            out[official_name(name)] = t.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", out)
    (directory / "config.json").write_text(json.dumps(hub_config(cfg), indent=1) + "\n")
    write_test_tokenizer(directory, cfg["vocab_size"])
    return directory


_CONVERT = """
import sys
sys.path.insert(0, {src!r})
import convert_hf_to_gguf as conv
from conversion import base
# the tests' tokenizer is not among the converter's known pre-tokenizers: call it DeepSeek-V3's
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
sys.argv = ["convert_hf_to_gguf.py", {ckpt!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
conv.main()
"""


def convert(src: Path, ckpt: Path, out: Path, dtype: str) -> Path:
    if out.exists():
        return out
    code = _CONVERT.format(src=str(src), ckpt=str(ckpt), out=str(out), outtype={"bf16": "bf16", "f32": "f32"}[dtype])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    _run([sys.executable, "-c", code], "convert", out.with_suffix(".convert.log"), env=env)
    return out


# ---- measuring -------------------------------------------------------------------------------------

def llama_bench(exe: Path, gguf: Path, threads: int, prefill: list[int], decode_depth: int, steps: int,
                reps: int, log: Path) -> dict:
    """tokens/s of llama-bench's tests: ``pp{n}`` for each prefill length, ``tg{steps}@d{depth}``."""
    out = {}
    for args, key in ([(["-p", str(n), "-n", "0"], f"prefill_{n}") for n in prefill]
                      + [(["-p", "0", "-n", str(steps), "-d", str(decode_depth)], "decode")]):
        r = _run([str(exe), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json", *args],
                 "llama-bench", log)
        rows = json.loads(r.stdout)
        out[key] = {"tokens_per_s": rows[0]["avg_ts"], "stddev": rows[0].get("stddev_ts"),
                    "test": {k: rows[0].get(k) for k in ("n_prompt", "n_gen", "n_depth", "n_threads", "type_k")}}
    return out


def v4c_runs(ckpt: Path, art: Path, dtype: str, threads: int, prefill: list[int], decode_depth: int,
             steps: int) -> dict:
    from cpu_vs_hf import run_child
    common = ["--ckpt", str(ckpt), "--art", str(art), "--dtype", dtype]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the child's torch threads, as llama-bench's -t
    try:
        out = {f"prefill_{n}": run_child(common, engine="v4c", task="prefill", T=n, repeat=2 if n <= 1024 else 1)
               for n in prefill}
        out["decode"] = run_child(common, engine="v4c", task="decode", T=decode_depth, batch=1, steps=steps)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return {k: {"tokens_per_s": v["tokens_per_s"]} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None,
                    help="a preset of bench_configs.py or a JSON file of config fields (default: 478m; --quick: quick)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-cpp", type=Path, default=None, help="a llama.cpp source tree (default: fetched)")
    ap.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="which source release to fetch")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="the small model, short runs (a smoke run)")
    a = ap.parse_args()

    import cpu_vs_hf
    from bench_configs import load_config
    name, cfg = load_config(a.config or ("quick" if a.quick else "478m"))
    if a.quick:  # llama.cpp's V4 loader takes compression ratios 0, 4 and 128 only (the released ones)
        cfg = dict(cfg, compress_rates={k: (128 if v > 4 else v) for k, v in cfg["compress_rates"].items()})
    work = a.workdir or Path(tempfile.mkdtemp(prefix="v4c-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("V4C_CACHE_DIR") or Path.home() / ".cache" / "v4c")
    prefill, depth, steps = ([64, 256], 128, 16) if a.quick else ([512, 4096], 2048, 128)
    result = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/cpu_vs_llamacpp.py", *sys.argv[1:]]),
              "machine": cpu_vs_hf.machine(), "dtype": a.dtype, "threads": a.threads, "config": name,
              "shapes": {"prefill": prefill, "decode_context": depth, "decode_steps": steps},
              "llama_cpp": {"source": str(a.llama_cpp) if a.llama_cpp else f"llama-cpp-python {a.llama_cpp_python} sdist"}}
    ckpt = work / f"ckpt-{a.dtype}"
    if not (ckpt / "model.safetensors").exists():
        print(f"writing the checkpoint (official names, {a.dtype}) to {ckpt}", file=sys.stderr)
        write_release_checkpoint(cfg, ckpt, a.dtype)
    import v4c
    from v4c.inspect import inspect_artifact
    art = work / f"art-{a.dtype}"
    if not art.exists():
        v4c.compile(ckpt, art, target="cpu", dtype=a.dtype, weights="reference")
    result["model"] = {"params": inspect_artifact(art)["params"], "config": cfg}

    llama = None
    try:
        src = a.llama_cpp or llama_cpp_sources(cache, a.llama_cpp_python)
        print(f"llama.cpp sources: {src}", file=sys.stderr)
        exe = build_llama_bench(src)
        result["llama_cpp"]["version"] = llama_cpp_version(src, exe)
        gguf = convert(src, ckpt, work / f"model-{a.dtype}.gguf", a.dtype)
        llama = llama_bench(exe, gguf, a.threads, prefill, depth, steps, 2 if a.quick else 3, work / "llama-bench.log")
    except StepFailed as e:
        result["llama_cpp"]["failed"] = {"step": e.step, "message": e.message[-2000:]}
        print(f"llama.cpp: {e.step} failed:\n{e.message}", file=sys.stderr)
    t0 = time.perf_counter()
    ours = v4c_runs(ckpt, art, a.dtype, a.threads, prefill, depth, steps)
    result["v4c"] = ours
    result["v4c_seconds"] = time.perf_counter() - t0
    if llama:
        result["llama_cpp"]["results"] = llama
        result["ratio_v4c_over_llama_cpp"] = {k: ours[k]["tokens_per_s"] / llama[k]["tokens_per_s"] for k in ours}
    text = json.dumps(result, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
