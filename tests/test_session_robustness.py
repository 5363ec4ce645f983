"""Sessions under interruption, threads, bad arguments, a memory plan that does not fit, and padding."""
import threading

import pytest
import torch

import v4c
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from v4c.runtime import free_memory
from v4c.runtime import session as session_mod
from v4c.runtime.session import SessionBrokenError, SessionMemoryError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    write_random_checkpoint(tiny_config_dict(), root / "ckpt", seed=0)
    return root


@pytest.fixture(scope="module")
def artifacts(checkpoint):
    """dtype -> a compiled tiny model, each compiled once for the module."""
    made = {}

    def get(dtype):
        if dtype not in made:
            made[dtype] = v4c.compile(checkpoint / "ckpt", checkpoint / f"art-{dtype}", target="cpu", dtype=dtype)
        return made[dtype]
    return get


@pytest.fixture(scope="module")
def model(artifacts):
    return v4c.load(artifacts("f32"), device="cpu")


def _ids(model, shape, seed):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


class _Raise:
    """Makes the model's executor raise ``exc`` on its ``at``-th op call (counting every op of every
    forward from the start of the ``with``); the plan is restored after."""

    def __init__(self, model, at, exc):
        self.executor, self.at, self.exc, self.calls = model.executor, at, exc, 0

    def _wrap(self, fn):
        def op(*args, **kw):
            self.calls += 1
            if self.calls == self.at:
                raise self.exc
            return fn(*args, **kw)
        return op

    def __enter__(self):
        self.saved = dict(self.executor.plans)
        self.executor.plans = {ph: [(self._wrap(e[0]), *e[1:]) for e in plan] for ph, plan in self.saved.items()}
        return self

    def __exit__(self, *exc):
        self.executor.plans = self.saved
        return False


# --- an interrupted forward ---------------------------------------------------------------------

@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("op failed"), TimeoutError("server timeout")])
def test_interrupted_forward_marks_the_session_until_reset(model, exc):
    ids, more = _ids(model, (2, 12), 1), _ids(model, (2, 1), 2)
    fresh = model.new_session(2, max_context=64)
    want = torch.cat([fresh.forward(ids), fresh.forward(more)], dim=1)

    s = model.new_session(2, max_context=64)
    s.forward(ids)
    n_ops = len(model.executor.plans["decode"])
    with _Raise(model, n_ops // 2, exc):  # half-way through the decode step: some states written, some not
        with pytest.raises(type(exc)):
            s.forward(more)
    assert s.lengths.tolist() == [12, 12]
    assert type(exc).__name__ in s.broken
    with pytest.raises(SessionBrokenError, match=r"reset\(\)"):
        s.forward(more)  # (the old code returned logits off by up to ~1.5 here, no error)
    with pytest.raises(SessionBrokenError, match=type(exc).__name__):
        s.forward(more)  # refused again: nothing was run by the refused call

    s.reset()
    assert s.broken is None
    got = torch.cat([s.forward(ids), s.forward(more)], dim=1)
    assert torch.equal(got, want)


def test_interrupt_in_a_prefill_and_an_error_before_any_state_write(model):
    ids = _ids(model, (1, 30), 3)
    want = model.new_session(1, max_context=64).forward(ids)
    s = model.new_session(1, max_context=64)
    with _Raise(model, 5, KeyboardInterrupt()):
        with pytest.raises(KeyboardInterrupt):
            s.forward(ids)
    with pytest.raises(SessionBrokenError, match="KeyboardInterrupt"):
        s.forward(ids)
    s.reset()
    assert torch.equal(s.forward(ids), want)
    # an argument refused by the checks runs nothing: the session stays usable
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.forward(torch.tensor([[model.config.vocab_size]]))
    assert s.broken is None
    s.forward(ids[:, :1])


def test_one_session_refuses_a_second_thread(model):
    s = model.new_session(1, max_context=64)
    inside, go_on = threading.Event(), threading.Event()
    plan = model.executor.plans["decode"]  # 4 tokens: a decode-sized call
    first = plan[0]

    def blocking(*args, **kw):
        inside.set()
        go_on.wait(10)
        return first[0](*args, **kw)

    plan[0] = (blocking, *first[1:])
    errors = []
    try:
        t = threading.Thread(target=lambda: s.forward(_ids(model, (1, 4), 4)))
        t.start()
        assert inside.wait(10)
        try:
            s.forward(_ids(model, (1, 4), 5))
        except RuntimeError as e:
            errors.append(str(e))
        go_on.set()
        t.join(30)
    finally:
        plan[0] = first
    assert errors and "another thread" in errors[0]
    assert s.lengths.tolist() == [4] and s.broken is None  # the first thread's call finished untouched


# --- threads ----------------------------------------------------------------------------------

def _run(model, prompt, steps):
    s = model.new_session(prompt.shape[0], max_context=64)
    out = [s.forward(prompt)]
    for i in range(steps):
        out.append(s.forward(out[-1][:, -1:].argmax(-1)))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_concurrent_sessions_equal_serial_runs(artifacts, dtype):
    model = v4c.load(artifacts(dtype), device="cpu")
    prompts = [_ids(model, (1 + i % 2, 3 + i), 10 + i) for i in range(8)]  # batches and lengths differ
    serial = [_run(model, p, 3) for p in prompts]
    results, errors = [None] * 8, []
    start = threading.Barrier(8)

    def work(i):
        try:
            start.wait(30)
            results[i] = _run(model, prompts[i], 3)
        except BaseException as e:  # reported below: an exception in a thread would pass silently
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i, (a, b) in enumerate(zip(results, serial)):
        assert torch.equal(a, b), f"thread {i}: max diff {(a - b).abs().max().item()}"


def test_forward_flips_no_process_wide_switch(artifacts, monkeypatch):
    """The oneDNN switch is process-wide: flipping it per call changed the kernels (and bf16 results)
    under every other thread's session."""
    model = v4c.load(artifacts("bf16"), device="cpu")
    flips = []
    monkeypatch.setattr(torch._C, "_set_mkldnn_enabled", lambda on: flips.append(on))
    before = torch.backends.mkldnn.enabled
    _run(model, _ids(model, (1, 5), 20), 3)  # a prefill and three single-token decode steps
    assert flips == [] and torch.backends.mkldnn.enabled == before


# --- arguments refused before any work ------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "0.7"}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"seed": "7"}, "seed"),
    ({"on_token": 3}, "on_token"),
])
def test_bad_sampling_arguments_are_refused_before_the_prefill(model, monkeypatch, kw, match):
    calls = []
    monkeypatch.setattr(model.executor, "run", lambda *a, **k: calls.append(1))
    args = {"max_new_tokens": 3, **kw}
    n = args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        model.generate(_ids(model, (1, 6), 6), n, **args)
    assert calls == []


def test_a_tiny_temperature_samples_the_argmax(model):
    ids = _ids(model, (2, 6), 7)
    greedy = model.generate(ids, 4)
    assert torch.equal(model.generate(ids, 4, temperature=1e-45, seed=0), greedy)


# --- the memory plan --------------------------------------------------------------------------------

def test_a_session_larger_than_memory_is_refused_before_allocating(model):
    if session_mod.available_memory(torch.device("cpu")) is None:
        pytest.skip("this platform reports no available memory")
    with pytest.raises(SessionMemoryError, match=r"batch_size 10000000 .* available on cpu.*smaller batch_size"):
        model.new_session(10**7)


def test_the_memory_plan_is_what_a_session_allocates(model, monkeypatch):
    need = model.new_session(3, max_context=300).memory()["total"]
    monkeypatch.setattr(session_mod, "available_memory", lambda device: need - 1)
    with pytest.raises(MemoryError, match="max_context 300"):
        model.new_session(3, max_context=300)
    monkeypatch.setattr(session_mod, "available_memory", lambda device: need)
    assert model.new_session(3, max_context=300).memory()["total"] == need


@pytest.mark.parametrize("bad", [2.5, "4", True])
def test_non_integer_sizes_are_refused(model, bad):
    with pytest.raises(ValueError, match="must be an integer"):
        model.new_session(bad)
    with pytest.raises(ValueError, match="must be an integer"):
        model.new_session(1, max_context=bad)


# --- padding in ragged batches -----------------------------------------------------------------------

def test_padding_ids_are_ignored_whatever_their_value(model):
    vocab = model.config.vocab_size
    ids = _ids(model, (3, 7), 8)
    lengths = torch.tensor([7, 4, 0])
    junk, zeros = ids.clone(), ids.clone()
    junk[1, 4:], junk[2, :] = vocab + 1000, -5  # beyond the vocabulary / negative: padding all the same
    zeros[1, 4:], zeros[2, :] = 0, 0
    a, b = model.new_session(3, max_context=32), model.new_session(3, max_context=32)
    la, lb = a.forward(junk, lengths), b.forward(zeros, lengths)
    assert torch.equal(la[0], lb[0]) and torch.equal(la[1, :4], lb[1, :4])
    assert a.lengths.tolist() == [7, 4, 0]
    step = _ids(model, (3, 1), 9)
    assert torch.equal(a.forward(step), b.forward(step))  # the states were the same too
    # and each row as if it had run alone
    alone = model.new_session(1, max_context=32).forward(ids[1:2, :4])
    assert torch.allclose(la[1:2, :4], alone, atol=1e-4, rtol=1e-4)
    # ids past the vocabulary are still refused where they are tokens
    with pytest.raises(ValueError, match=r"2024 at \[1, 4\] is outside the vocabulary"):
        model.new_session(3, max_context=32).forward(junk, torch.tensor([7, 5, 0]))


def test_a_cgroup_limit_counts_its_droppable_page_cache_as_free(tmp_path):
    (tmp_path / "memory.max").write_text("1000\n")
    (tmp_path / "memory.current").write_text("900\n")
    (tmp_path / "memory.stat").write_text("anon 700\ninactive_file 150\n")
    files = ("memory.max", "memory.current", "memory.stat", "inactive_file")
    assert free_memory._cgroup_level(tmp_path, *files) == 250
    (tmp_path / "memory.max").write_text("max\n")
    assert free_memory._cgroup_level(tmp_path, *files) is None
    assert free_memory._cgroup_level(tmp_path / "absent", *files) is None


# --- what forward returns is the caller's ---------------------------------------------------------

class _StaticOutputGraph:
    """Stands in for a captured CUDA graph (which needs a GPU): every replay runs the step and writes
    its logits into one static f32 buffer, which it returns, exactly as a replay does."""

    def __init__(self, executor, states):
        self.executor, self.states, self.out = executor, states, None

    def run(self, ids, pos):
        (logits,) = self.executor.run({"ids": ids, "pos": pos}, self.states)
        if self.out is None:
            self.out = torch.empty_like(logits, dtype=torch.float32)
        self.out.copy_(logits)
        return self.out


def test_decode_logits_are_never_a_buffer_the_next_step_writes(model):
    ids = torch.randint(0, 1024, (2, 6), generator=torch.Generator().manual_seed(5))
    ref = model.new_session(2)
    ref.forward(ids)
    want = [ref.forward(ids[:, i:i + 1]).clone() for i in range(3)]
    s = model.new_session(2)
    s.forward(ids)
    s._graph = _StaticOutputGraph(model.executor, s.states)
    got = [s.forward(ids[:, i:i + 1]) for i in range(3)]  # held across later steps, as a caller would
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len({g.data_ptr() for g in got} | {s._graph.out.data_ptr()}) == 4


def test_a_replayed_step_never_returns_the_buffer_the_next_step_writes(model):
    """On CUDA a decode step replays a graph whose logits live in one static buffer; what ``forward``
    returns must be the caller's own (an f32 model's ``.float()`` would be that very buffer)."""
    from v4c.runtime.cuda_graphs import StaticOutputStep
    eager = model.new_session(1, max_context=64)
    s = model.new_session(1, max_context=64)
    s._graph = StaticOutputStep(model.executor, s.states)  # what a CUDA session holds, run eagerly
    prompt = _ids(model, (1, 5), 7)
    eager.forward(prompt)
    s.forward(prompt)
    steps = [_ids(model, (1, 1), 8 + i) for i in range(3)]
    got = [s.forward(x) for x in steps]
    want = [eager.forward(x) for x in steps]
    assert all(g.data_ptr() != s._graph.out.data_ptr() for g in got)
    for g, w in zip(got, want):  # earlier steps' logits were not overwritten by later steps
        assert torch.equal(g, w)
