"""``v4c demo``: build a tiny random V4, compile, load, generate, and say how long each step took."""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch

from .compiler import compile as compile_model
from .model.presets import tiny_config_dict
from .model.random_weights import write_random_checkpoint
from .runtime.loader import load


def run_demo(prompt_len: int = 12, new_tokens: int = 16, seed: int = 0, print_fn=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="v4c-demo-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_random_checkpoint(tiny_config_dict(), tmp / "tiny", seed=seed)
        t1 = time.perf_counter()
        print_fn(f"checkpoint  tiny DeepSeek-V4 (sliding, CSA and HCA layers, hash and score routing, mHC), "
                 f"random weights, seed {seed}  [{t1 - t0:.2f}s]")
        compile_model(tmp / "tiny", tmp / "tiny.v4c", target="cpu")
        t2 = time.perf_counter()
        print_fn(f"compile     {tmp / 'tiny.v4c'}  [{t2 - t1:.2f}s]")
        # the cpu backend's native operators are compiled once per machine (then cached), before the
        # load binds its implementations: not part of the load or the prefill
        from .backends.cpu import native
        with warnings.catch_warnings():  # said on the line below instead of as a warning
            warnings.simplefilter("ignore", native.NativeUnavailableWarning)
            lib = native.library()
        t2b = time.perf_counter()
        print_fn(f"native ops  {'ready' if lib is not None else 'unavailable (' + str(native.why()) + ')'}"
                 f"  [{t2b - t2:.2f}s; built on a machine's first run, then loaded from the cache]")
        model = load(tmp / "tiny.v4c", device="cpu")
        t3 = time.perf_counter()
        print_fn(f"load        verified manifest, mapped weights, bound each op's implementation  [{t3 - t2b:.2f}s]")
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        session = model.new_session(1)
        t4 = time.perf_counter()
        logits = session.forward(prompt)
        t5 = time.perf_counter()
        tokens = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1)
            tokens.append(int(nxt))
            logits = session.forward(nxt[:, None])
        t6 = time.perf_counter()
        print_fn(f"prompt      {prompt[0].tolist()}")
        print_fn(f"generated   {tokens}")
        print_fn(f"prefill     {prompt_len} tokens in {t5 - t4:.3f}s ({prompt_len / (t5 - t4):.0f} tok/s)")
        print_fn(f"decode      {new_tokens} tokens in {t6 - t5:.3f}s ({new_tokens / (t6 - t5):.1f} tok/s, greedy)")
        return {"prompt": prompt[0].tolist(), "tokens": tokens}
