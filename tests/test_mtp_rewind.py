"""Rewinding states after a partly rejected verify step (issue 21), at the state level: every buffer equals,
bit for bit, the buffer of a session that never saw the rejected tokens."""
import pytest
import torch

import v4c
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from v4c.runtime.rewind import RewindPoint
from v4c.runtime.state_layout import StateLayout


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # every token reaches every expert: a call's arithmetic for one token then does not depend on the call's
    # other tokens (grouped expert GEMMs of other sizes round differently), so "never saw them" is exact
    cfg = tiny_config_dict(n_routed_experts=2, num_experts_per_tok=2)
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp("rw") / "ck", seed=0, mtp=True)


@pytest.mark.parametrize("kv,ix", [("fp32", "fp32"), ("fp8", "fp4")])
def test_rewound_states_equal_a_session_that_never_saw_the_rejected_tokens(ckpt, kv, ix):
    model = v4c.load(v4c.compile(ckpt, ckpt.parent / f"art-{kv}-{ix}", target="cpu", kv_cache=kv, indexer_cache=ix,
                                 overwrite=True))
    gen = torch.Generator().manual_seed(0)
    # rows at lengths 13, 14, 15, 16: the verify tokens complete CSA rows (every 4), an HCA row (16) and wrap
    # the window ring (8) at a different offset in each row; rows keep different numbers of tokens
    lengths = torch.tensor([13, 14, 15, 16])
    prompt = torch.randint(0, 1024, (4, 16), generator=gen)
    for k, keep in ((1, [1, 2, 2, 1]), (2, [1, 2, 3, 1]), (3, [4, 1, 2, 3]), (3, [2, 3, 4, 1])):
        keep = torch.tensor(keep)
        verify = torch.randint(0, 1024, (4, k + 1), generator=gen)
        never = model.new_session(4, 64)
        never.forward(prompt, lengths=lengths)
        never.forward(verify, lengths=keep)  # the same call, its rejected tokens padding: never written
        spec = model.new_session(4, 64)
        spec.forward(prompt, lengths=lengths)
        point = spec.rewind_point([k + 1] * 4)
        spec.forward(verify)
        assert not torch.equal(spec.states["l0.win"], never.states["l0.win"])  # the rejected tokens wrote
        spec.rewind(point, keep)
        assert torch.equal(spec.lengths, never.lengths) and spec.lengths.tolist() == (lengths + keep).tolist()
        differ = [n for n in spec.states if not torch.equal(spec.states[n], never.states[n])]
        assert not differ, (k, keep, differ)
        nxt = torch.randint(0, 1024, (4, 2), generator=gen)
        assert torch.equal(spec.forward(nxt), never.forward(nxt))  # and the two go on alike

def test_the_mtp_windows_chained_entries_are_taken_back_exactly(ckpt):
    model = v4c.load(v4c.compile(ckpt, ckpt.parent / "art-mtp", target="cpu", overwrite=True))
    s = model.new_session(2, 64)
    ids = torch.randint(0, 1024, (2, 21), generator=torch.Generator().manual_seed(1))
    s.forward(ids[:, :20])
    state = model.mtp.new_state(2, 64)
    state.forward(ids[:, 1:], s.stream)
    before = {n: t.clone() for n, t in state.states.items()}
    point = RewindPoint.take(state.states, model.mtp.layouts, state.lengths, torch.tensor([3, 2]))
    stream = s.stream[:, -1:]
    for tok in (5, 6, 7):  # three chained entries; row 1 takes two of them
        _, stream = state.forward(torch.tensor([[tok], [tok]]), stream, torch.tensor([1, int(tok < 7)]))
    state.lengths.copy_(point.restore(state.states, torch.zeros(2, dtype=torch.int64)))
    assert state.lengths.tolist() == [20, 20]
    assert all(torch.equal(before[n], state.states[n]) for n in before)


def test_rewind_point_on_rings_and_rows():
    """Ring slots of taken-back tokens get their earlier values; rows they completed get theirs; the rest keeps
    what the call wrote."""
    ring, rows = StateLayout("r", "window", None, 8), StateLayout("c", "compressed_rows", 4, None)
    states = {"r": torch.arange(16.0).reshape(2, 8), "c": torch.arange(20.0).reshape(2, 10)}
    start, counts = torch.tensor([6, 11]), torch.tensor([4, 3])
    point = RewindPoint.take(states, {"r": ring, "c": rows}, start, counts)
    before = {n: t.clone() for n, t in states.items()}
    for t in states.values():
        t.fill_(-5.0)  # the call writes every slot (and more)
    lengths = point.restore(states, torch.tensor([1, 3]))
    assert lengths.tolist() == [7, 14]
    # row 0 keeps position 6 (slot 6); positions 7, 8, 9 (slots 7, 0, 1) are taken back; position 7 completed row 1
    assert states["r"][0].tolist() == [0.0, 1.0, -5.0, -5.0, -5.0, -5.0, -5.0, 7.0]
    assert states["c"][0].tolist() == [-5.0, 1.0] + [-5.0] * 8
    assert torch.equal(states["r"][1], torch.full((8,), -5.0))  # row 1 keeps all three
    with pytest.raises(ValueError, match="keep must hold"):
        point.restore(states, torch.tensor([5, 0]))
    short = StateLayout("p", "compressor_state", None, 2)
    with pytest.raises(ValueError, match="a ring of 2 slots, fewer than the 3 tokens of one call"):
        RewindPoint.take({"p": torch.zeros(1, 2)}, {"p": short}, torch.tensor([0]), torch.tensor([3]))


def test_session_refuses_a_point_it_did_not_come_from(ckpt):
    model = v4c.load(v4c.compile(ckpt, ckpt.parent / "art-refuse", target="cpu", overwrite=True))
    s = model.new_session(1, 32)
    s.forward(torch.tensor([[1, 2, 3]]))
    point = s.rewind_point([2])
    with pytest.raises(ValueError, match="not where the rewind point's call left it"):
        s.rewind(point, [1])
    s.forward(torch.tensor([[4, 5]]))
    s.rewind(point, [1])
    assert s.lengths.tolist() == [4] and s.broken is None
