"""Resumed requests against transformers' ``DeepseekV4ForCausalLM`` on HF-named checkpoints (fp32): the
logits after a resume from the prefix cache, at a block boundary, at odd positions inside and past the
window (where earlier requests ended) and after a disk round trip, equal the oracle's for the same
tokens and v4c's uncached run."""
import pytest
import torch

import v4c
from hf_reference import VARIANTS, hf_logits_nocache, make_hf_model, save_checkpoint
from v4c.runtime.prefix_cache import PrefixCache

TOL_HF = 1e-4  # as tests/test_against_hf.py
TOL_SELF = 1e-5  # resumed against uncached: only the prefix's call shapes differ


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resumed_logits_equal_transformers(variant, tmp_path):
    cfg = VARIANTS[variant]
    hf = make_hf_model(cfg, seed=1)
    save_checkpoint(hf, cfg, tmp_path / "ckpt")
    model = v4c.load(v4c.compile(tmp_path / "ckpt", tmp_path / "art", target="cpu"), device="cpu")
    ids = torch.randint(0, cfg["vocab_size"], (1, 640), generator=torch.Generator().manual_seed(2))
    tokens = ids[0].tolist()
    want = hf_logits_nocache(hf, ids)
    plain = model.new_session(1, max_context=640).forward(ids)
    assert rel(plain, want) <= TOL_HF
    window = cfg["sliding_window"]
    cache = PrefixCache.for_model(model, disk_dir=tmp_path / "cache")
    s = model.new_session(2, max_context=640)
    ends = (window - 2, 256, 300, 512)  # a short turn inside the first window, a boundary, a turn past it, ...
    for end in ends:
        s.forward_rows(0, 1, ids[:, int(s.lengths[0]):end])
        cache.store(s, 0, tokens[:end])
    cache.flush()
    for end, prompt in ((window - 2, 200), (300, 400), (512, 640)):
        s.reset_rows([1])
        assert cache.resume(s, 1, tokens[:prompt]) == end
        got = s.forward_rows(1, 2, ids[:, end:prompt])
        assert rel(got, want[:, end:prompt]) <= TOL_HF, end
        assert rel(got, plain[:, end:prompt]) <= TOL_SELF, end
    # a restart: only the disk files remain
    again = PrefixCache.for_model(model, memory_bytes=0, disk_dir=tmp_path / "cache")
    fresh = model.new_session(1, max_context=640)
    assert again.resume(fresh, 0, tokens) == 512
    got = fresh.forward(ids[:, 512:])
    assert rel(got, want[:, 512:]) <= TOL_HF and rel(got, plain[:, 512:]) <= TOL_SELF
    assert again.stats()["disk"]["reads"] == 1
