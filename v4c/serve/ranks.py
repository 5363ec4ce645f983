"""Serving a sharded artifact: rank 0 takes the requests, every other rank follows its calls.

Rank 0 runs the engine and the HTTP server. Its engine talks to a ``LeaderSession``: before each
session call (a forward over some rows, emptying rows, emptying everything) it broadcasts a command
on a control group, then makes the call, which is itself collective (``DistributedSession``). Every
other rank sits in ``follow``: it receives the command and makes the same call, with rank 0's
arguments broadcast inside it. So the ranks run the same sequence of collectives, in the same order.

The control group waits without a timeout worth the name: an idle server sends nothing for hours, and
the followers must not take that for a lost peer. The calls themselves run on the default group, with
its timeout. When rank 0 stops it sends STOP and the followers return; if rank 0 dies, their wait on
the control group fails (its socket closes) and they return with an error.
"""
from __future__ import annotations

import datetime
import logging

import torch

log = logging.getLogger("v4c.serve")

STOP, FORWARD_ROWS, RESET_ROWS, RESET = range(4)
_IDLE_DAYS = 3650  # the control group's timeout: an idle server is not a lost peer


def control_group():
    """A gloo group over every rank for the commands (every rank calls this once, in the same order)."""
    import torch.distributed as dist
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=_IDLE_DAYS))


def _send(group, op: int) -> None:
    import torch.distributed as dist
    dist.broadcast(torch.tensor([op], dtype=torch.int64), src=0, group=group)


class LeaderSession:
    """Rank 0's session for the engine: each call is announced to the followers, then made."""

    def __init__(self, session, group):
        self.session, self.group = session, group
        self.batch_size, self.max_context = session.batch_size, session.max_context
        self.lengths = session.lengths
        self._stopped = False

    @property
    def broken(self):
        return self.session.broken

    @property
    def broken_rows(self):
        return self.session.broken_rows

    def memory(self) -> dict[str, int]:
        """Rank 0's state bytes (under attn=dp each rank holds its share of the rows)."""
        return self.session.memory()

    def forward_rows(self, a: int, b: int, ids: torch.Tensor, lengths=None, logits: str = "all") -> torch.Tensor:
        _send(self.group, FORWARD_ROWS)
        return self.session.forward_rows(a, b, ids, lengths, logits)

    def reset_rows(self, rows) -> None:
        _send(self.group, RESET_ROWS)
        self.session.reset_rows(rows)

    def reset(self) -> None:
        _send(self.group, RESET)
        self.session.reset()

    def stop(self) -> None:
        """Tells the followers to return (once). A follower already gone (torchrun stops every rank on
        Ctrl-C or SIGTERM) is not an error here: there is nobody left to tell."""
        if not self._stopped:
            self._stopped = True
            try:
                _send(self.group, STOP)
            except RuntimeError as e:
                log.warning("the other ranks had already stopped (%s)", str(e).splitlines()[0][:200])


def follow(session, group) -> None:
    """A follower rank's loop: make each call rank 0 announces, until it sends STOP. A call that fails
    here failed on rank 0 too (the checks run on every rank with the same arguments): log it, go on."""
    import signal

    import torch.distributed as dist
    # Ctrl-C reaches every rank of the terminal's process group: rank 0 stops serving and sends STOP;
    # a follower that quit on its own SIGINT would fail rank 0's last calls instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    op = torch.zeros(1, dtype=torch.int64)
    while True:
        dist.broadcast(op, src=0, group=group)
        cmd = int(op)
        if cmd == STOP:
            return
        try:
            if cmd == FORWARD_ROWS:
                session.forward_rows(0, 1)
            elif cmd == RESET_ROWS:
                session.reset_rows()
            elif cmd == RESET:
                session.reset()
            else:
                raise RuntimeError(f"unknown command {cmd} from rank 0")
        except (ValueError, RuntimeError) as e:
            if "collective failed" in str(e):
                raise
            log.warning("rank %d: a call failed as it did on rank 0: %s", dist.get_rank(), e)
