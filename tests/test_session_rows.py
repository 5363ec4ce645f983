"""Rows used independently (what the serving engine needs): ``Session.forward_rows`` on a row range,
``Session.reset_rows``, and per-row sampling (``sampling.sample_rows``), each bit-exact against the
plain calls it stands for."""
import pytest
import torch

import v4c
from v4c.runtime.sampling import sample, sample_rows, token_logprobs
from v4c.runtime.session import SessionBrokenError


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return v4c.load(tiny_artifact, device="cpu")


def _ids(model, shape, seed):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _snapshot(session, rows):
    return {k: v[rows].clone() for k, v in session.states.items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class _FailAt:
    """Makes the executor's ``at``-th op call (counting from the ``with``) raise RuntimeError."""

    def __init__(self, model, at):
        self.executor, self.at, self.calls = model.executor, at, 0

    def _wrap(self, fn):
        def op(*args, **kw):
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError("op failed")
            return fn(*args, **kw)
        return op

    def __enter__(self):
        self.saved = dict(self.executor.plans)
        self.executor.plans = {ph: [(self._wrap(e[0]), *e[1:]) for e in plan] for ph, plan in self.saved.items()}

    def __exit__(self, *exc):
        self.executor.plans = self.saved
        return False


def test_forward_rows_equals_a_session_of_those_rows_and_leaves_the_others(model):
    """Rows 1..2 of a 4-row session, driven by forward_rows (a ragged prefill, then decode steps), give
    exactly the logits of a 2-row session driven by forward; rows 0 and 3 are not touched."""
    big, small = model.new_session(4, max_context=64), model.new_session(2, max_context=64)
    big.forward(_ids(model, (4, 5), 0), lengths=[5, 0, 0, 4])  # rows 0 and 3 hold something to disturb
    before = _snapshot(big, [0, 3])
    ids = _ids(model, (2, 20), 1)
    got = [big.forward_rows(1, 3, ids, lengths=[20, 13])]
    want = [small.forward(ids, lengths=[20, 13])]
    for step in range(3):
        nxt = _ids(model, (2, 1), 10 + step)
        got.append(big.forward_rows(1, 3, nxt))
        want.append(small.forward(nxt))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert big.lengths.tolist() == [5, 23, 16, 4]
    assert _same(_snapshot(big, [0, 3]), before)
    # one row alone, as a session of one: a prefill chunk and a decode step
    one = model.new_session(1, max_context=64)
    p = _ids(model, (1, 30), 2)
    big.reset_rows([3])
    assert torch.equal(big.forward_rows(3, 4, p), one.forward(p))
    assert torch.equal(big.forward_rows(3, 4, p[:, :1]), one.forward(p[:, :1]))


@pytest.fixture(scope="module")
def fp8_model(tiny_artifact, tmp_path_factory):
    """The tiny model with fp8 KV rows and MXFP4 indexer keys (u8 storage buffers)."""
    art = v4c.compile(tiny_artifact.parent / "ckpt", tmp_path_factory.mktemp("fp8") / "art", target="cpu",
                      kv_cache="fp8", indexer_cache="fp4")
    return v4c.load(art, device="cpu")


@pytest.mark.parametrize("which", ["plain", "fp8"])
def test_reset_rows_empties_those_rows_and_nothing_else(model, fp8_model, which):
    model = model if which == "plain" else fp8_model
    s = model.new_session(3, max_context=64)
    s.forward(_ids(model, (3, 17), 3), lengths=[17, 9, 12])
    keep = _snapshot(s, [0, 2])
    s.reset_rows([1])
    assert s.lengths.tolist() == [17, 0, 12]
    assert _same(_snapshot(s, [0, 2]), keep)  # bit for bit
    fresh = model.new_session(1, max_context=64)
    assert _same(_snapshot(s, [1]), _snapshot(fresh, [0]))  # exactly an empty row
    # the emptied row starts a new sequence exactly as a fresh session does; the others go on as before
    p = _ids(model, (1, 11), 4)
    assert torch.equal(s.forward_rows(1, 2, p), fresh.forward(p))
    ref = model.new_session(3, max_context=64)
    ref.forward(_ids(model, (3, 17), 3), lengths=[17, 9, 12])
    nxt = _ids(model, (1, 1), 5)
    assert torch.equal(s.forward_rows(2, 3, nxt), ref.forward_rows(2, 3, nxt))
    s.reset_rows(torch.tensor([0, 2]))
    s.reset_rows([])
    assert s.lengths.tolist() == [0, 11, 0]


def test_row_calls_refuse_bad_arguments_and_run_nothing(model):
    s = model.new_session(3, max_context=32)
    s.forward_rows(1, 2, _ids(model, (1, 30), 6))
    for a, b in ((2, 2), (-1, 1), (1, 4), (2, 1)):
        with pytest.raises(ValueError, match="row range"):
            s.forward_rows(a, b, _ids(model, (1, 1), 0))
    with pytest.raises(ValueError, match="row range 0:2 holds 2 rows"):
        s.forward_rows(0, 2, _ids(model, (3, 1), 0))
    with pytest.raises(ValueError, match="row 1 would reach 33 tokens"):  # the session's row number
        s.forward_rows(0, 2, _ids(model, (2, 3), 0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.forward_rows(2, 3, torch.tensor([[model.config.vocab_size]]))
    with pytest.raises(ValueError, match="lengths"):
        s.forward_rows(0, 2, _ids(model, (2, 2), 0), lengths=[3, 0])
    for bad in ([3], [-1], 1, ["a"], torch.tensor([0.5])):
        with pytest.raises(ValueError, match="row"):
            s.reset_rows(bad)
    assert s.broken is None and s.lengths.tolist() == [0, 30, 0]


def test_an_interrupted_row_call_breaks_only_its_rows(model):
    """An op error inside forward_rows(1, 4) with row 2 as padding: rows 1 and 3 are part-written, the
    session refuses calls until they are emptied, and rows 0 and 2 keep their state bit for bit."""
    s = model.new_session(4, max_context=64)
    s.forward(_ids(model, (4, 9), 7))
    keep = _snapshot(s, [0, 2])
    with _FailAt(model, len(model.executor.plans["decode"]) // 2):
        with pytest.raises(RuntimeError, match="op failed"):
            s.forward_rows(1, 4, _ids(model, (3, 2), 8), lengths=[2, 0, 1])
    assert s.broken is not None and s.broken_rows == [1, 3]
    with pytest.raises(SessionBrokenError, match=r"reset_rows\(\[1, 3\]\)"):
        s.forward_rows(0, 1, _ids(model, (1, 1), 9))
    s.reset_rows([1])
    with pytest.raises(SessionBrokenError):  # row 3 still part-written
        s.forward(_ids(model, (4, 1), 9))
    s.reset_rows([3])
    assert s.broken is None and s.broken_rows == []
    assert _same(_snapshot(s, [0, 2]), keep)
    ref = model.new_session(4, max_context=64)
    ref.forward(_ids(model, (4, 9), 7))
    nxt = _ids(model, (1, 1), 10)
    assert torch.equal(s.forward_rows(2, 3, nxt), ref.forward_rows(2, 3, nxt))
    # a whole-session forward that fails marks every row, as before
    with _FailAt(model, 3):
        with pytest.raises(RuntimeError):
            s.forward(_ids(model, (4, 1), 11))
    assert s.broken_rows == [0, 1, 2, 3]
    s.reset()
    assert s.broken is None


def test_sample_rows_is_sample_row_by_row(model):
    logits = torch.randn(6, model.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    logits[4, 7] = logits[4, 9] = logits[4].max() + 1  # an exact tie: argmax takes the first
    temps = [0.0, 0.7, 1.0, 0.0, 0.0, 1.3]
    tops = [1.0, 0.9, 1.0, 0.5, 1.0, 0.8]
    seeds = [None, 11, 12, None, None, 13]

    def gens():
        return [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    got = sample_rows(logits, temps, tops, gens())
    want = [int(sample(logits[i:i + 1], temps[i], tops[i], g)[0]) for i, g in enumerate(gens())]
    assert got.tolist() == want
    assert got[0] == logits[0].argmax() and got[3] == logits[3].argmax() and got[4] == 7
    # a row's draws come from its own generator only: other rows, their order or count change nothing
    g1, g2 = gens(), gens()
    seq_a = [sample_rows(logits[[1, 5]], [0.7, 1.3], [0.9, 0.8], [g1[1], g1[5]]).tolist() for _ in range(5)]
    seq_b = [sample_rows(logits[[5, 0, 1]], [1.3, 0.0, 0.7], [0.8, 1.0, 0.9], [g2[5], None, g2[1]]).tolist()
             for _ in range(5)]
    assert [a[0] for a in seq_a] == [b[2] for b in seq_b]
    assert [a[1] for a in seq_a] == [b[0] for b in seq_b]
    for bad, match in ((dict(temperatures=[0.0] * 5), "temperatures must hold one value per row"),
                       (dict(top_ps=[1.0] * 5 + [0.0]), "top_p"),
                       (dict(temperatures=[float("nan")] * 6), "temperature")):
        args = {**dict(temperatures=temps, top_ps=tops, generators=gens()), **bad}
        with pytest.raises(ValueError, match=match):
            sample_rows(logits, **args)


def test_token_logprobs(model):
    logits = torch.randn(3, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    toks = torch.tensor([5, 0, 17])
    got = token_logprobs(logits, toks, 4)
    ref = torch.log_softmax(logits, dim=-1)
    for i, (lp, alts) in enumerate(got):
        assert lp == pytest.approx(float(ref[i, toks[i]]), abs=1e-6)
        vals, ids = ref[i].topk(4)
        assert [a for a, _ in alts] == ids.tolist()
        assert [b for _, b in alts] == pytest.approx(vals.tolist(), abs=1e-6)
    assert all(alts == [] for _, alts in token_logprobs(logits, toks, 0))
