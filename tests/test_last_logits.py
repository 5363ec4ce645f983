"""``logits="last"``: a forward call returns each row's last token's logits alone, the LM head run on
those tokens only. Checked against the same calls returning every token's logits: the same values,
the same states afterwards, the same stream (the MTP block's input), on every backend the CPU has,
for ragged rows and row ranges, and where the graph's head is not a separable ``linear``."""
import pytest
import torch

import v4c
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint


@pytest.fixture(scope="module", params=["cpu", "reference"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("last")
    ckpt = write_random_checkpoint(tiny_config_dict(), root / "ck", seed=3, mtp=True)
    return v4c.load(v4c.compile(ckpt, root / "art", target="cpu"), backend=request.param)


def _ids(model, shape, seed):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _same_states(a, b):
    return all(torch.equal(a.states[k], b.states[k]) for k in a.states)


@pytest.mark.parametrize("t,lengths", [(37, None), (37, [37, 1, 20, 9]), (2, [2, 1, 0, 2]), (1, None)])
def test_last_equals_every_tokens_logits_at_each_rows_last_token(model, t, lengths):
    ids = _ids(model, (4, t), t)
    full, last = model.new_session(4, max_context=128), model.new_session(4, max_context=128)
    for step in range(3):  # a prefill, then calls that continue it
        want = full.forward(ids, lengths)
        got = last.forward(ids, lengths, logits="last")
        n = [t] * 4 if lengths is None else lengths
        assert got.shape == (4, 1, model.config.vocab_size) and got.dtype == torch.float32
        for r in range(4):
            if n[r]:  # (a padding row's logits mean nothing)
                torch.testing.assert_close(got[r, 0], want[r, n[r] - 1], rtol=1e-5, atol=1e-5)
        assert _same_states(full, last)
        assert torch.equal(full.lengths, last.lengths)
        assert torch.equal(full.stream, last.stream)  # the stream stays whole: every token's hidden state
        ids = _ids(model, (4, t), 100 + step)


def test_forward_rows_last(model):
    full, last = model.new_session(4, max_context=64), model.new_session(4, max_context=64)
    ids = _ids(model, (2, 23), 5)
    want = full.forward_rows(1, 3, ids, [23, 11])
    got = last.forward_rows(1, 3, ids, [23, 11], logits="last")
    torch.testing.assert_close(got[:, 0], torch.stack([want[0, 22], want[1, 10]]), rtol=1e-5, atol=1e-5)
    assert _same_states(full, last)


def test_without_a_separable_head_the_logits_are_taken_after_it(model, monkeypatch):
    """A graph whose logits do not come from one per-token linear (a sharded tail, say) computes every
    position's and returns the rows' last: the same values."""
    ids = _ids(model, (2, 19), 7)
    want = model.new_session(2, max_context=32).forward(ids, [19, 6], logits="last")
    monkeypatch.setattr(model.executor, "_head", None)
    got = model.new_session(2, max_context=32).forward(ids, [19, 6], logits="last")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_is_unchanged_by_the_last_token_head(model):
    """generate's prefill asks for the last token's logits only: the tokens equal greedy decoding from
    every token's logits."""
    ids = _ids(model, (2, 30), 9)
    s = model.new_session(2, max_context=64)
    logits, toks = s.forward(ids), []
    for _ in range(6):
        nxt = logits[:, -1].argmax(-1)
        toks.append(nxt)
        logits = s.forward(nxt[:, None])
    got = model.generate(ids, max_new_tokens=6)
    assert torch.equal(got[:, 30:], torch.stack(toks, 1))


def test_a_bad_logits_value_is_refused(model):
    s = model.new_session(1, max_context=16)
    with pytest.raises(ValueError, match="logits must be 'all'.*or 'last'.*got 'first'"):
        s.forward(_ids(model, (1, 3), 0), logits="first")
    assert int(s.lengths[0]) == 0  # refused before anything ran
