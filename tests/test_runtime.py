"""Runtime: sessions, input checks, sampling, generate."""
import pytest
import torch

import v4c
from v4c.runtime.sampling import sample


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return v4c.load(tiny_artifact, device="cpu")


def test_forward_shapes_and_state_growth(model):
    s = model.new_session(2, max_context=64)
    out = s.forward(torch.zeros(2, 5, dtype=torch.long))
    assert out.shape == (2, 5, model.config.vocab_size) and out.dtype == torch.float32
    assert s.lengths.tolist() == [5, 5]
    s.forward(torch.ones(2, 1, dtype=torch.long), lengths=[1, 0])
    assert s.lengths.tolist() == [6, 5]


def test_decode_equals_prefill(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    full = model.new_session(1).forward(ids)
    s = model.new_session(1)
    steps = torch.cat([s.forward(ids[:, i:i + 1]) for i in range(40)], dim=1)
    assert torch.allclose(full, steps, atol=1e-4, rtol=1e-4)


def test_reset_gives_the_same_logits(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    s = model.new_session(1)
    a = s.forward(ids)
    s.reset()
    assert torch.equal(s.forward(ids), a)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 2, 5000]]), "outside the vocabulary"),
    (torch.tensor([[-1]]), "outside the vocabulary"),
    (torch.zeros(2, 3, dtype=torch.long), "batch 2"),
    (torch.zeros(3, dtype=torch.long), "integer tensor"),
    (torch.zeros(1, 3), "integer tensor"),
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
])
def test_bad_ids_raise_value_error(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.new_session(1, max_context=16).forward(bad)


def test_context_limits(model):
    s = model.new_session(1, max_context=8)
    s.forward(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond this session's max_context 8"):
        s.forward(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.new_session(1, max_context=model.config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="lengths"):
        model.new_session(1, max_context=8).forward(torch.zeros(1, 2, dtype=torch.long), lengths=[3])


def test_sampling_modes():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert sample(logits).tolist() == [1]
    draws = [int(sample(logits, 1.0, 0.9, torch.Generator().manual_seed(i))) for i in range(50)]
    assert set(draws) <= {1, 3} and len(set(draws)) == 2  # nucleus keeps the two big ones only
    a = [int(sample(logits, 2.0, 1.0, torch.Generator().manual_seed(7))) for _ in range(3)]
    b = [int(sample(logits, 2.0, 1.0, torch.Generator().manual_seed(7))) for _ in range(3)]
    assert a == b
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, -1.0)


def test_generate_greedy_seeded_and_lengths(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    g = model.generate(ids, 5)
    assert g.shape == (2, 11) and torch.equal(g[:, :6], ids)
    s = model.new_session(2)  # greedy generate == argmax chain
    logits = s.forward(ids)
    for i in range(5):
        nxt = logits[:, -1].argmax(-1)
        assert torch.equal(nxt, g[:, 6 + i])
        logits = s.forward(nxt[:, None])
    t1 = model.generate(ids, 8, temperature=1.0, top_p=0.9, seed=3)
    t2 = model.generate(ids, 8, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(t1, t2)
    seen = []
    model.generate(ids[:1], 3, on_token=lambda t: seen.append(int(t[0])))
    assert len(seen) == 3


def test_memory_report(model):
    s = model.new_session(2, max_context=256)
    mem = s.memory()
    assert mem["total"] == sum(t.numel() * t.element_size() for t in s.states.values())
    # 4 layers of fp32 rings [W, head_dim] and int64 positions [W], 2 sequences
    assert mem["window"] == 4 * 2 * model.config.sliding_window * (model.config.head_dim * 4 + 8)


@pytest.mark.parametrize("context", [1, 255, 256, 257, 1000])
def test_memory_plan_equals_inspect(model, tiny_artifact, context):
    """States are allocated once, in whole 256-token blocks, exactly as `v4c inspect` predicts."""
    from v4c.inspect import inspect_artifact
    s = model.new_session(3, max_context=context)
    assert s.allocated_tokens == -(-context // 256) * 256
    kv = inspect_artifact(tiny_artifact, context=context)["kv_cache"]
    mem = s.memory()
    assert {k: mem[k] for k in kv["by_kind"]} == {k: 3 * v for k, v in kv["by_kind"].items()}
    assert mem["total"] == 3 * kv["total_bytes"] and all(v > 0 for v in kv["by_kind"].values())
    assert kv["allocated_tokens"] == s.allocated_tokens
    rows = [t for n, t in s.states.items() if n.endswith("comp.rows")]
    assert rows and all(t.shape[1] in (s.allocated_tokens // 4, s.allocated_tokens // 16) for t in rows)


def test_buffers_never_move_or_grow(model):
    s = model.new_session(1, max_context=300)
    ptrs = {n: t.data_ptr() for n, t in s.states.items()}
    before = s.memory()
    s.forward(torch.zeros(1, 290, dtype=torch.long))
    for _ in range(10):
        s.forward(torch.zeros(1, 1, dtype=torch.long))
    assert s.memory() == before and {n: t.data_ptr() for n, t in s.states.items()} == ptrs
    with pytest.raises(ValueError, match="beyond this session's max_context 300"):
        s.forward(torch.zeros(1, 1, dtype=torch.long))


def test_inspect_text_shows_the_memory_plan(tiny_artifact):
    from v4c.inspect import format_report, inspect_artifact
    r = inspect_artifact(tiny_artifact, context=300)
    line = next(ln for ln in format_report(r).splitlines() if ln.startswith("memory"))
    assert "512 tokens in 256-token blocks" in line
    assert f"compressed rows {r['kv_cache']['by_kind']['compressed_rows'] / 2**20:.2f} MiB" in line
