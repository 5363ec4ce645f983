"""Helpers the serving tests share: a server in a thread, greedy decoding alone as the reference, and
the comparison of an engine's tokens with it."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch


@contextlib.contextmanager
def uvicorn_server(app):
    """``app`` served on a free loopback port from a background thread; yields its base URL."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@torch.inference_mode()
def greedy_reference(model, prompt, n):
    """Greedy tokens as ``model.generate`` computes them (a one-row session: the prefill in one call,
    then one decode step per token), with the logits each token was chosen from."""
    s = model.new_session(1, max_context=len(prompt) + n)
    logits = s.forward(torch.tensor([prompt]))[0, -1]
    toks, seen = [], []
    for i in range(n):
        toks.append(int(logits.argmax()))
        seen.append(logits)
        if i + 1 < n:
            logits = s.forward(torch.tensor([[toks[-1]]]))[0, -1]
    return toks, seen


def assert_agrees(got, want, want_logits, what):
    """``got`` equals ``want`` token for token, except at a near-exact tie. The engine computes a row in
    calls of other shapes than a lone ``generate`` (other rows in its decode calls, its prompt cut into
    chunks, a verify call of k + 1 tokens), and a matrix product of another shape rounds differently: its
    fp32 logits differ from the lone run's by ~1e-6. That can change a greedy token only where the lone
    run's top two logits are that close; there the engine must have taken the other of the two, and the
    sequences go on from different contexts, so the comparison ends."""
    for k, (g, w) in enumerate(zip(got, want)):
        if g != w:
            vals, ids = want_logits[k].topk(2)
            gap = float(vals[0] - vals[1])
            assert gap <= 1e-5 * abs(float(vals[0])), f"{what}: token {k} is {g}, alone {w} (top-2 gap {gap:.3g})"
            assert g in ids.tolist(), f"{what}: token {k} is {g}, not one of the lone run's top two {ids.tolist()}"
            return
    assert len(got) == len(want), what
