"""The executor's straight-line step (runtime/step_code.py) against the loop it replaced: the same
outputs and states bit for bit in both phases, with and without ``last``; the state-buffer check; a
plan's functions wrapped in place are the ones that run; no string from the graph in its source."""
import pytest
import torch

import v4c
from v4c.runtime.executor import _take


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return v4c.load(tiny_artifact, device="cpu")


def _loop(ex, inputs, states, phase, last=None):
    """The executor's former interpreter loop, written out here as the reference."""
    env = {**ex.params, **states, **inputs}
    head = ex._head if last is not None else None
    for k, ((fn, ins, outs, attrs, state_io, name), dead) in enumerate(zip(ex.plans[phase], ex.frees)):
        args = [env[i] for i in ins]
        if k == head:
            args[0] = _take(args[0], last)
        res = fn(*args, **attrs)
        res = res if isinstance(res, tuple) else (res,)
        for ii, oi in state_io:
            assert res[oi] is args[ii]
        env.update(zip(outs, res))
        for v in dead:
            del env[v]
    out = [env[o] for o in ex.graph.outputs]
    if last is not None and head is None:
        out[0] = _take(out[0], last)
    return out


def _inputs(s, ids):
    pos = s.lengths[:, None] + torch.arange(ids.shape[1])[None, :]
    return {"ids": ids, "pos": pos}


@pytest.mark.parametrize("batch,prompt,seed", [(1, 37, 0), (3, 16, 1), (2, 70, 2)])
def test_step_equals_the_loop(model, batch, prompt, seed):
    ex = model.executor
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    a, b = model.new_session(batch, max_context=prompt + 8), model.new_session(batch, max_context=prompt + 8)
    with torch.inference_mode():
        for t, last in ((prompt, torch.tensor([prompt - 1 - r for r in range(batch)])), (1, None), (1, None),
                        (3, None)):
            ids = torch.randint(0, vocab, (batch, t), generator=g)
            phase = "decode" if batch * t <= 16 else "prefill"
            got = ex.run(_inputs(a, ids), a.states, phase=phase, last=last)
            want = _loop(ex, _inputs(b, ids), b.states, phase, last)
            assert len(got) == len(want)
            for x, y in zip(got, want):
                assert torch.equal(x, y)
            for k in a.states:
                assert torch.equal(a.states[k], b.states[k]), k
            a.lengths += t
            b.lengths += t


def test_a_new_state_tensor_is_refused(model):
    ex = model.executor
    plan = ex.plans["decode"]
    k = next(i for i, e in enumerate(plan) if e[4])  # a node that updates a state in place
    fn, ins, outs, attrs, state_io, name = plan[k]
    ii, oi = state_io[0]

    def moved(*args, **kw):
        res = fn(*args, **kw)
        res = list(res) if isinstance(res, tuple) else [res]
        res[oi] = res[oi].clone()
        return tuple(res)

    plan[k] = (moved, ins, outs, attrs, state_io, name)  # replaced in place: the step reads the plan per call
    try:
        s = model.new_session(1, max_context=8)
        with pytest.raises(RuntimeError, match=f"op {name} returned a new tensor for state %{ins[ii]}"):
            s.forward(torch.zeros(1, 1, dtype=torch.long))
    finally:
        plan[k] = (fn, ins, outs, attrs, state_io, name)
    model.new_session(1, max_context=8).forward(torch.zeros(1, 1, dtype=torch.long))  # restored


def test_wrapped_functions_run_and_names_stay_out_of_the_source(model):
    ex = model.executor
    plan = ex.plans["decode"]
    calls = []
    saved = list(plan)
    for k, (fn, *rest) in enumerate(saved):
        def counted(*a, _fn=fn, _k=k, **kw):
            calls.append(_k)
            return _fn(*a, **kw)
        plan[k] = (counted, *rest)
    try:
        model.new_session(1, max_context=8).forward(torch.zeros(1, 1, dtype=torch.long))
    finally:
        plan[:] = saved
    assert calls == list(range(len(plan)))
    src = ex._step.source  # no string literal at all: the graph's names are looked up by index
    assert "'" not in src and '"' not in src and "\\" not in src
    assert src.count("_e = _plan[") == len(ex.graph.nodes)
