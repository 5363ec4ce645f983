"""Snapshots of one sequence (``Session.snapshot`` / ``restore``) and the prefix cache's memory tier
(``v4c.runtime.prefix_cache``), on the tiny random model: what a restored row holds, that it goes on
exactly as the original, that resuming equals computing (fp32, <= 1e-5), keys, LRU and references."""
import json

import pytest
import torch

import v4c
from v4c.cli import main
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from v4c.runtime.prefix_cache import PrefixCache
from v4c.runtime.snapshot import snapshot_footprint
from v4c.runtime.state_layout import StateLayout, state_layouts

FORMATS = {"f32": {}, "bf16": {"kv_cache": "bf16", "indexer_cache": "bf16"},
           "fp8-fp4": {"kv_cache": "fp8", "indexer_cache": "fp4"}, "fp8-fp8": {"kv_cache": "fp8", "indexer_cache": "fp8"}}
W = tiny_config_dict()["sliding_window"]  # 8: positions below it are inside the first window


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pc")
    write_random_checkpoint(tiny_config_dict(), root / "ckpt", seed=0)
    return {name: v4c.load(v4c.compile(root / "ckpt", root / name, target="cpu", **kw), device="cpu")
            for name, kw in FORMATS.items()}


def _ids(n, seed):
    return torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(seed))


def _empty(t):
    """Every slot at its fill value (-1 in integer buffers, 0 else)."""
    return bool((t == (0 if t.is_floating_point() else -1)).all())


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_live_positions_of_each_ring():
    window = StateLayout("w", "window", None, ring=8)
    csa = StateLayout("p", "compressor_state", None, ring=8, pool=4)  # previous window + current
    hca = StateLayout("h", "compressor_state", None, ring=16, pool=16)
    assert list(window.live_positions(5)) == [0, 1, 2, 3, 4] and list(window.live_positions(300)) == list(range(292, 300))
    assert list(csa.live_positions(3)) == [0, 1, 2] and list(csa.live_positions(256)) == [252, 253, 254, 255]
    assert list(csa.live_positions(258)) == [252, 253, 254, 255, 256, 257]
    assert list(hca.live_positions(256)) == [] and list(hca.live_positions(261)) == [256, 257, 258, 259, 260]
    with pytest.raises(ValueError, match="compressed rows, not a ring"):
        StateLayout("r", "compressed_rows", 4, None).live_positions(8)


def test_every_pending_ring_knows_its_compressor(models):
    lays = state_layouts(models["f32"].graph)
    pend = {n: lay.pool for n, lay in lays.items() if lay.kind == "compressor_state"}
    assert pend and all(pend.values())
    assert pend["l1.comp.pend_kv"] == 4 and pend["l2.comp.pend_kv"] == 16


@pytest.mark.parametrize("fmt,p", [("f32", 3), ("f32", W), ("f32", 301), ("f32", 512), ("fp8-fp4", 3),
                                   ("fp8-fp4", 301), ("fp8-fp4", 512), ("bf16", 301), ("fp8-fp8", 515)])
def test_a_restored_row_holds_the_live_state_and_goes_on_bit_for_bit(models, fmt, p):
    """Positions inside the first window (3), at its end, past it, at block boundaries and between."""
    model = models[fmt]
    ids = _ids(p + 24, p)
    a = model.new_session(1, max_context=768)
    a.forward(ids[:, :p])
    snap = a.snapshot(0)
    assert snap.length == p and len(snap.blocks) == p // 256
    b = model.new_session(3, max_context=768)
    b.forward_rows(0, 1, _ids(40, 99))  # another row in use: restore touches only its own
    other = {k: v[0].clone() for k, v in b.states.items()}
    b.restore(1, snap)
    assert b.lengths.tolist() == [40, p, 0]
    empty = model.new_session(1, max_context=768)
    for name, lay in state_layouts(model.graph, a.states).items():
        got, want = b.states[name][1], a.states[name][0]
        if lay.ratio is not None or lay.pool is None:  # rows (the rest at fill) and windows: all of it
            assert torch.equal(got, want), name
        else:  # pending slots: the live ones; the stale ones (never read again) at the fill value
            live = [q % lay.ring for q in lay.live_positions(p)]
            stale = [s for s in range(lay.ring) if s not in live]
            assert torch.equal(got[live], want[live]), name
            assert _empty(got[stale]), name
        assert torch.equal(b.states[name][0], other[name]) and torch.equal(b.states[name][2], empty.states[name][0])
    for t in (ids[:, p:p + 23], ids[:, p + 23:]):  # a prefill chunk, then a decode step
        assert torch.equal(b.forward_rows(1, 2, t), a.forward(t))


def test_rows_restored_at_different_lengths_go_on_in_one_ragged_call(models):
    model = models["f32"]
    ids = _ids(600, 11)
    origs, snaps = [], []
    for p in (301, 517):
        o = model.new_session(1, max_context=768)
        o.forward(ids[:, :p])
        origs.append(o)
        snaps.append(o.snapshot(0))
    s = model.new_session(2, max_context=768)
    for row, snap in enumerate(snaps):
        s.restore(row, snap)
    nxt = _ids(12, 12).repeat(2, 1)
    got = s.forward(nxt, lengths=[12, 5])  # rows at 301 and 517, appending 12 and 5 tokens
    # (a call of two rows rounds as a call of one does not: ~1e-6)
    assert rel(got[0], origs[0].forward(nxt[:1])[0]) <= 1e-5 and rel(got[1, :5], origs[1].forward(nxt[1:, :5])[0]) <= 1e-5
    assert s.lengths.tolist() == [313, 522]


def test_restore_refuses_what_does_not_fit_and_writes_nothing(models):
    f32, fp8 = models["f32"], models["fp8-fp4"]
    a = f32.new_session(1, max_context=600)
    a.forward(_ids(520, 1))
    snap = a.snapshot(0)
    s = f32.new_session(2, max_context=600)
    s.forward_rows(0, 1, _ids(5, 2))
    with pytest.raises(ValueError, match=r"row 0 holds 5 tokens; restore needs an empty row \(reset_rows\(\[0\]\)"):
        s.restore(0, snap)
    with pytest.raises(ValueError, match="snapshot tail of state %l0.win is torch.float32 .*needs torch.uint8"):
        fp8.new_session(1, max_context=600).restore(0, snap)
    short = f32.new_session(1, max_context=300)
    with pytest.raises(ValueError, match="does not fit this session's 512 allocated tokens"):
        short.restore(0, snap)
    with pytest.raises(ValueError, match="expected a Snapshot, got dict"):
        s.restore(1, {})
    with pytest.raises(ValueError, match=r"rows \[2\] are outside 0..1"):
        s.restore(2, snap)
    assert s.lengths.tolist() == [5, 0] and short.lengths.tolist() == [0] and s.broken is None
    assert all(_empty(t[1]) for t in s.states.values())


def _chunked(session, ids, cuts):
    """Feeds ``ids`` to row 0 cut at ``cuts``; returns the logits of the last piece."""
    out, at = None, 0
    for c in [*cuts, ids.shape[1]]:
        out = session.forward(ids[:, at:c])
        at = c
    return out


@pytest.mark.parametrize("fmt", ["f32", "fp8-fp4"])
def test_resuming_from_the_cache_equals_computing(models, fmt):
    """A 700-token prompt resumed at 512 (a boundary) and a 600-token turn resumed at 300 (where an
    earlier request ended) give the logits of an uncached run: fp32 within 1e-5 (the prefix's calls
    had other shapes, rounding ~1e-6); every format exactly the original row's continuation."""
    model = models[fmt]
    cache = PrefixCache.for_model(model)
    ids = _ids(700, 5)
    s = model.new_session(2, max_context=1024)
    for end in (256, 300, 512):  # the first request passes two boundaries and ends at 300 ... 512
        s.forward_rows(0, 1, ids[:, int(s.lengths[0]):end])
        cache.store(s, 0, ids[0, :end].tolist())
    assert cache.resume(s, 1, ids[0].tolist()) == 512
    got = s.forward_rows(1, 2, ids[:, 512:])
    assert torch.equal(got, s.forward_rows(0, 1, ids[:, 512:]))
    want = model.new_session(1, max_context=1024).forward(ids)[:, 512:]
    if fmt == "f32":
        assert rel(got, want) <= 1e-5
    s.reset_rows([1])
    assert cache.resume(s, 1, ids[0, :400].tolist()) == 300  # the exact end, not the 256 boundary
    got = s.forward_rows(1, 2, ids[:, 300:400])
    if fmt == "f32":
        assert rel(got, model.new_session(1, max_context=1024).forward(ids[:, :400])[:, 300:]) <= 1e-5
    st = cache.stats()
    assert (st["hits"], st["hit_tokens"], st["stores"]) == (2, 812, 3)


def _found(cache, prompt, limit=None):
    """The length ``lookup`` finds (None: nothing), its hold released."""
    hit = cache.lookup(prompt, limit)
    if hit is None:
        return None
    cache.release(hit)
    return hit.length


def test_lookup_takes_the_longest_prefix_within_its_limit(models):
    model = models["f32"]
    cache = PrefixCache(identity="a" * 64)
    ids = _ids(800, 6)[0].tolist()
    s = model.new_session(1, max_context=1024)
    for end in (256, 270, 512, 530):
        s.forward(torch.tensor([ids[int(s.lengths[0]):end]]))
        cache.store(s, 0, ids[:end])
    assert not cache.store(s, 0, ids[:530])  # held already
    for prompt, limit, want in ((ids, None, 530), (ids[:530], None, 512), (ids, 529, 512), (ids[:400], None, 270),
                                (ids[:270], None, 256), (ids[:256], None, None), (ids[:10], None, None)):
        assert _found(cache, prompt, limit) == want, (len(prompt), limit)
    other = ids[:300] + [(t + 1) % 1024 for t in ids[300:]]  # diverges at 300, inside the second block
    assert _found(cache, other) == 270
    assert _found(cache, [(ids[0] + 1) % 1024] + ids[1:]) is None  # another first block: nothing
    assert PrefixCache(identity="b" * 64).chain(ids)[1] != cache.chain(ids)[1]  # keys are per artifact
    chain = cache.chain(ids)
    assert len(chain) == 4 and cache.chain(ids, known=chain[:2]) == chain and chain[0] == cache.root


def test_memory_tier_shares_blocks_evicts_oldest_and_never_a_held_one(models):
    model = models["f32"]
    ids, other = _ids(800, 7)[0].tolist(), _ids(300, 70)[0].tolist()
    s = model.new_session(1, max_context=800)
    s.forward(torch.tensor([ids[:256]]))
    block, state = s.snapshot(0).blocks[0].nbytes, s.snapshot(0).tail_nbytes
    # three boundaries of one prefix: three blocks (each held once) and three boundaries' ring slots
    cache = PrefixCache(identity="c" * 64, memory_bytes=3 * block + 3 * state)
    cache.store(s, 0, ids[:256])
    for end in (512, 768):
        s.forward(torch.tensor([ids[int(s.lengths[0]):end]]))
        cache.store(s, 0, ids[:end])
    st = cache.stats()["memory"]
    assert (st["entries"], st["blocks"], st["bytes"], st["evictions"]) == (3, 3, 3 * block + 3 * state, 0)
    held = cache.lookup(ids[:300])  # the 256 entry, held from here on
    h512 = cache.lookup(ids[:600])
    assert h512.snapshot.blocks[0] is held.snapshot.blocks[0]  # one block object for the shared prefix
    cache.release(h512)
    assert _found(cache, ids) == 768  # (a use: 256 is now the least recently used, and held)
    s.reset()
    s.forward(torch.tensor([other[:256]]))
    cache.store(s, 0, other[:256])  # a block and a state more: 512 (only its state) and 768 go; 256 is held
    st = cache.stats()["memory"]
    assert (st["evictions"], st["entries"], st["bytes"]) == (2, 2, 2 * block + 2 * state)
    assert _found(cache, ids[:600]) == 256 and _found(cache, ids) == 256 and _found(cache, other) == 256
    cache.release(held)


def test_a_snapshot_over_the_whole_budget_is_not_kept(models):
    model = models["f32"]
    s = model.new_session(1, max_context=512)
    s.forward(_ids(300, 8))
    cache = PrefixCache(identity="d" * 64, memory_bytes=1000)
    assert cache.store(s, 0, _ids(300, 8)[0].tolist())
    assert cache.stats()["memory"]["entries"] == 0 and _found(cache, _ids(301, 8)[0].tolist()) is None
    with pytest.raises(ValueError, match="row 0 holds 300 tokens, not the 299 given"):
        cache.store(s, 0, _ids(299, 8)[0].tolist())
    with pytest.raises(ValueError, match="memory_bytes must be an integer >= 0"):
        PrefixCache(identity="d" * 64, memory_bytes=-1)


def test_model_prefix_cache_is_keyed_by_the_artifact_state(models):
    f32, fp8 = models["f32"], models["fp8-fp4"]
    assert f32.prefix_cache is f32.prefix_cache and f32.prefix_cache.stats()["disk"] is None
    assert f32.prefix_cache.identity != fp8.prefix_cache.identity  # another cache format, another key


def test_inspect_gives_the_snapshot_bytes_per_block(models, tmp_path, capsys):
    model = models["fp8-fp4"]
    assert main(["inspect", str(model.path), "--json", "--context", "1024"]) == 0
    r = json.loads(capsys.readouterr().out)
    cc = r["context_cache"]
    assert cc == snapshot_footprint(model.graph, 1024) and cc["block_tokens"] == 256
    s = model.new_session(1, max_context=1024)
    s.forward(_ids(512, 9))
    snap = s.snapshot(0)
    assert cc["block_bytes"] == snap.blocks[0].nbytes and cc["boundary_state_bytes"] == snap.tail_nbytes
    assert cc["prefix_bytes"] == 4 * cc["block_bytes"] + cc["boundary_state_bytes"]
    # rows per block grow as the cache does: a block is 256 tokens of the rows' share of bytes_per_token
    rows = sum(v for k, v in r["kv_cache"]["by_kind"].items() if k in ("compressed_rows", "indexer_keys"))
    assert cc["block_bytes"] == rows * 256 // r["kv_cache"]["allocated_tokens"]
