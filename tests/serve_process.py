"""Tests' helpers for a `v4c serve` started as its own process."""
import socket
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(p, base: str, timeout: float = 120) -> None:
    """Waits until the server process ``p`` answers /health at ``base``; fails with its output if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, p.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "v4c serve did not come up"
        time.sleep(0.2)
