"""Running a sharded artifact on N ranks with ``torch.distributed`` (NCCL on CUDA, gloo on CPU).

Every rank runs the same program (``torchrun --nproc-per-node N`` or ``v4c run --world-size N``) and
calls the same API: ``load_distributed(path)`` then ``new_session`` / ``forward`` / ``generate``.
Requests enter on rank 0: its ``ids`` (and ``lengths``) are broadcast on every call, so the other ranks
may pass the same tensors or ``None``. Every rank returns the whole batch's logits and the same tokens.

Each rank reads only its own slices of the checkpoint: the tensors stay memory-mapped and a slice is a
view of the map (per-expert checkpoints read only this rank's experts). A rank that fails while
loading tells every rank why before anyone enters a collective, and the process group has a timeout,
so a rank that never starts is an error on the others, not a hang.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from pathlib import Path

import torch

from ..artifact.manifest import open_weights, verify_artifact
from ..backends import for_artifact
from ..errors import ArtifactError, V4CError
from ..graph.text import parse_graph
from ..graph.verify import verify
from ..io.checkpoint import Checkpoint
from ..io.naming import Source, plan_sources
from ..settings import dist_timeout
from .loader import BACKENDS
from .model import Model, cast_param
from .session import Session, _last_only

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MSG = 1024  # bytes of each rank's load error shared with the others


def _dist():
    import torch.distributed as dist
    return dist


def init_distributed(device=None, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join (or reuse) the default process group from torchrun's environment; returns (rank, world, device)."""
    dist = _dist()
    if not dist.is_initialized():
        missing = [k for k in ENV if k not in os.environ]
        if missing:
            raise V4CError(f"no process group and {', '.join(missing)} not set: start the ranks with torchrun "
                           f"--nproc-per-node N or v4c run --world-size N")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dev = _device(device, int(os.environ.get("LOCAL_RANK", rank)))
        timeout = timeout_s if timeout_s is not None else dist_timeout()
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout))
        except Exception as e:  # a peer that never joined: the store's wait times out
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise V4CError(f"rank {rank}: the process group of {world} ranks did not form within {timeout:g}s "
                           f"(did every rank start? {type(e).__name__}: {first[:300]})") from None
    else:
        dev = _device(device, int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return dist.get_rank(), dist.get_world_size(), dev


# how a lost peer shows in torch.distributed's errors: gloo's socket closes or resets, or the wait times out
_PEER_LOST = ("connection closed", "connection reset", "broken pipe", "connection refused", "timed out", "timeout",
              "communicator was aborted")


def _peer_lost(e: RuntimeError) -> bool:
    dist = _dist()
    if isinstance(e, getattr(dist, "DistError", ())):  # DistBackendError, DistNetworkError, ...
        return True
    text = str(e).lower()
    return any(k in text for k in _PEER_LOST)


@contextlib.contextmanager
def _collective(what: str):
    """Inside: collectives. A peer that exits, crashes or stops answering becomes a V4CError naming this rank,
    the rank(s) it was waiting on and ``what`` it was doing, instead of gloo's raw traceback."""
    try:
        yield
    except RuntimeError as e:
        dist = _dist()
        if not _peer_lost(e) or not dist.is_initialized():
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        others = [r for r in range(world) if r != rank]
        peer = (f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
                if len(others) <= 8 else f"one of the other {len(others)} ranks")
        lines = str(e).strip().splitlines()
        # gloo's first sentence, without its [file:line] prefix or the advice that follows
        detail = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else "").split(". ")[0][:200]
        raise V4CError(f"rank {rank} of {world}: a collective failed while {what}: {peer} exited, crashed or stopped "
                       f"answering (check that rank's output; {type(e).__name__}: {detail})") from e


def _device(device, local_rank: int) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def agree_ok(error: str | None, device: torch.device) -> None:
    """Every rank learns whether any rank failed; raises on every rank, naming each failed rank."""
    dist = _dist()
    data = (error or "").encode()[: _MSG - 1]
    buf = torch.zeros(_MSG, dtype=torch.uint8)
    buf[0] = 1 if error else 0
    buf[1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[1:1]
    buf = buf.to(device)
    got = [torch.zeros_like(buf) for _ in range(dist.get_world_size())]
    with _collective("checking that every rank loaded the artifact"):
        dist.all_gather(got, buf)
    failed = {r: bytes(g[1:].cpu().tolist()).rstrip(b"\0").decode(errors="replace") for r, g in enumerate(got)
              if int(g[0])}
    if failed:
        raise V4CError("loading failed on " + ", ".join(f"rank {r}" for r in failed) + ":\n  "
                       + "\n  ".join(f"rank {r}: {m}" for r, m in failed.items()))


def load_shards(ckpt: Checkpoint, full_params: dict, graph, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's params: each a view of the memory-mapped checkpoint, sliced as the graph's meta says."""
    sources = plan_sources(ckpt, full_params)
    slices = {s[0]: tuple(s[1:]) for s in dict(graph.meta).get("shards", ())}
    out = {}
    for name, t in graph.params:
        src = sources[name]
        if name in slices:
            dim, a, b = slices[name]
            if src.kind != "tensor" and dim == 0:  # per-expert tensors: read only this rank's experts
                x = Source(src.kind, src.names[a:b]).load(ckpt)
            else:
                x = src.load(ckpt).narrow(dim, a, b - a)
        else:
            x = src.load(ckpt)
        if tuple(x.shape) != tuple(t.shape):
            raise ArtifactError(f"shard of {name}: got shape {tuple(x.shape)}, the rank's graph wants {t}")
        out[name] = cast_param(x, t.dtype, device)
    return out


def load_distributed(path, device=None, backend: str | None = None, timeout_s: float | None = None
                     ) -> "DistributedModel":
    """This rank's part of the sharded artifact at ``path`` (every rank calls it)."""
    rank, world, dev = init_distributed(device, timeout_s)
    error, model = None, None
    try:
        man = verify_artifact(Path(path))
        par = man.parallel()
        if not par or par["world_size"] != world:
            have = par["world_size"] if par else 1
            raise ArtifactError(f"{man.root}: compiled for {have} rank(s), started with {world}; compile with "
                                f"--world-size {world}")
        root = man.root
        # read through the manifest: each file's bytes are checked against its hash right before use
        config = man.config()
        graph = verify(parse_graph(man.graph_text(rank)))
        if not man.has_weights:
            raise ArtifactError(f"{root}: weight-free artifact (compiled from a config only); it can be inspected "
                                f"but not run")
        full = parse_graph(man.graph_text())
        ckpt = open_weights(man)  # exactly the files the manifest names, never an index found beside them
        params = load_shards(ckpt, dict(full.params), graph, dev)
        kernels = man.kernels()
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    agree_ok(error, dev)  # nobody goes on into a collective that a failed rank will never join
    # triton: rank 0's kernel configs on every rank (broadcast), so no two ranks run different kernels
    with _collective("taking rank 0's kernel configs"):  # (the triton backend's kernels are bound here)
        model = Model(root, config, graph, params, dev, man.data, backend=for_artifact(backend, dev.type, root, kernels),
                      cuda_graphs=False)
    return DistributedModel(model, rank, world, par["attn"])


class DistributedModel:
    """One rank's view of a model sharded over ``world`` ranks; the same API as ``Model``."""

    def __init__(self, model: Model, rank: int, world: int, attn: str):
        self.model, self.rank, self.world, self.attn = model, rank, world, attn
        self.config, self.config_dict, self.device = model.config, model.config_dict, model.device
        self.graph, self.manifest, self.path = model.graph, model.manifest, model.path

    runnable = True

    def new_session(self, batch_size: int = 1, max_context: int | None = None) -> "DistributedSession":
        return DistributedSession(self, batch_size, max_context)

    def generate(self, ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, on_token=None):
        """As ``Model.generate``; every rank returns the same tokens (rank 0's prompt)."""
        return Model.generate(self, ids, max_new_tokens, temperature, top_p, seed, on_token)

    def close(self) -> None:
        """Leave the process group together: a barrier, then its teardown (a rank that exits while a
        peer still holds the group can make gloo abort that peer's exit)."""
        dist = _dist()
        if dist.is_initialized():
            with _collective("leaving the process group"):
                dist.barrier()
            dist.destroy_process_group()


class DistributedSession:
    """``Session`` over ranks. attn=dp: rank r keeps the state of its contiguous share of the rows and the
    logits are all-gathered; attn=tp: every rank keeps every row (one KV head: the cache is replicated)."""

    def __init__(self, model: DistributedModel, batch_size: int, max_context: int | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.lo, self.hi = self._share(model.rank)
        # a rank without a sequence (batch < world) still joins every collective: it runs one row that is
        # all padding (positions -1), which touches no state and whose logits are dropped
        self.idle = self.hi == self.lo
        self.local = model.model.new_session(max(self.hi - self.lo, 1), max_context)
        self.max_context = self.local.max_context
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=model.device)

    def reset(self) -> None:
        self.local.reset()
        self.lengths.zero_()

    def memory(self) -> dict[str, int]:
        """This rank's state bytes."""
        return self.local.memory()

    def _from_rank0(self, ids, lengths, logits="all"):
        dist, dev = _dist(), self.model.device
        head = torch.zeros(4, dtype=torch.int64)
        if self.model.rank == 0:
            ids = torch.as_tensor(ids)
            if ids.dim() != 2:
                raise ValueError(f"ids must be [batch, tokens], got shape {tuple(ids.shape)}")
            head = torch.tensor([ids.shape[0], ids.shape[1], lengths is not None, _last_only(logits)])
        head = head.to(dev)
        dist.broadcast(head, src=0)
        b, t, has_len, last = (int(x) for x in head.tolist())
        buf = ids.to(dev, torch.int64).contiguous() if self.model.rank == 0 else torch.empty(b, t, dtype=torch.int64,
                                                                                              device=dev)
        dist.broadcast(buf, src=0)
        lens = None
        if has_len:
            lens = (torch.as_tensor(lengths, dtype=torch.int64).reshape(-1).to(dev) if self.model.rank == 0
                    else torch.empty(b, dtype=torch.int64, device=dev))
            if lens.shape[0] != b:  # checked on rank 0 before anyone waits on a bad shape
                lens = torch.full((b,), -1, dtype=torch.int64, device=dev)
            dist.broadcast(lens, src=0)
        return buf, lens, ("last" if last else "all")

    @torch.inference_mode()
    def forward(self, ids=None, lengths=None, logits="all") -> torch.Tensor:
        with _collective("sharing rank 0's request"):
            ids, lengths, logits = self._from_rank0(ids, lengths, logits)
        n = Session._check(self, ids, lengths)  # the whole batch, on every rank: all raise or none does
        lo, hi = self.lo, self.hi
        with _collective("running the forward pass (expert all-to-all / all-reduce)"):
            if self.idle:
                logits = self.local.forward(ids[:1].clamp(0, 0), torch.zeros(1, dtype=torch.int64), logits)
            else:
                logits = self.local.forward(ids[lo:hi], None if lengths is None else lengths[lo:hi], logits)
        self.lengths += n
        if self.model.attn == "tp":
            return logits
        with _collective("gathering every rank's logits"):
            return self._gather(logits)

    __call__ = forward

    # -- rows used independently (serving): every rank calls these with rank 0's arguments ---------------

    @property
    def broken(self) -> str | None:
        return self.local.broken

    @property
    def broken_rows(self) -> list[int]:
        return [] if self.idle else [self.lo + r for r in self.local.broken_rows]

    def _share(self, rank: int) -> tuple[int, int]:
        """The rows rank ``rank`` keeps (attn=dp; every row under tp)."""
        if self.model.attn != "dp":
            return 0, self.batch_size
        base, extra = divmod(self.batch_size, self.model.world)
        lo = rank * base + min(rank, extra)
        return lo, lo + base + (rank < extra)

    @torch.inference_mode()
    def forward_rows(self, a: int, b: int, ids=None, lengths=None, logits="all") -> torch.Tensor:
        """``Session.forward_rows`` over ranks: rows ``a..b-1`` (global row numbers; rank 0's ``a``, ``b``,
        ``ids`` and ``lengths`` count, so every rank must pass the same range). Returns the range's
        logits on every rank. Under attn=dp each rank runs its part of the range, or one padding row
        when it holds none of it: the expert exchange needs every rank in every call."""
        with _collective("sharing rank 0's request"):
            rng = torch.tensor([a, b], dtype=torch.int64, device=self.model.device)
            _dist().broadcast(rng, src=0)
            a, b = (int(x) for x in rng.tolist())
            ids, lengths, logits = self._from_rank0(ids, lengths, logits)
        if not 0 <= a < b <= self.batch_size:
            raise ValueError(f"row range {a}:{b} is not a non-empty range within 0:{self.batch_size}")
        n = Session._check(self, ids, lengths, (a, b))  # on every rank: all raise or none does
        t = ids.shape[1]
        ia, ib = max(a, self.lo), min(b, self.hi)
        with _collective("running the forward pass (expert all-to-all / all-reduce)"):
            if ia < ib:
                part = None if lengths is None else lengths[ia - a:ib - a]
                logits = self.local.forward_rows(ia - self.lo, ib - self.lo, ids[ia - a:ib - a], part, logits)
            else:  # all padding (positions -1): touches no state, its logits are dropped
                logits = self.local.forward_rows(0, 1, torch.zeros(1, t, dtype=torch.int64, device=ids.device),
                                                 torch.zeros(1, dtype=torch.int64), logits)
        self.lengths[a:b] += n
        if self.model.attn == "tp":
            return logits
        with _collective("gathering every rank's logits"):
            return self._gather_range(logits if ia < ib else logits[:0], a, b)

    def _gather_range(self, logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Rows ``a..b-1`` of the ranks' parts, in order, on every rank."""
        dist, world = _dist(), self.model.world
        counts = [max(0, min(b, hi) - max(a, lo)) for lo, hi in map(self._share, range(world))]
        pad = logits.new_zeros(max(counts), *logits.shape[1:])
        pad[: logits.shape[0]] = logits
        got = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(got, pad.contiguous())
        return torch.cat([g[:c] for g, c in zip(got, counts) if c])

    def reset_rows(self, rows=None) -> None:
        """``Session.reset_rows`` over ranks (rank 0's ``rows``): each rank empties the ones it keeps."""
        dev = self.model.device
        error = None
        with _collective("sharing rank 0's rows to reset"):
            try:
                rows = Session._rows(self, rows) if self.model.rank == 0 else []
            except ValueError as e:  # the others are waiting for the rows: they learn of it (-1) and raise too
                error, rows = e, []
            head = torch.tensor([-1 if error else len(rows)], dtype=torch.int64, device=dev)
            _dist().broadcast(head, src=0)
            if int(head) < 0:
                raise error or ValueError("rank 0 was given rows to reset that are not rows of this session")
            buf = (torch.tensor(rows, dtype=torch.int64, device=dev) if self.model.rank == 0
                   else torch.empty(int(head), dtype=torch.int64, device=dev))
            if len(buf):
                _dist().broadcast(buf, src=0)
        rows = buf.tolist()
        mine = [r - self.lo for r in rows if self.lo <= r < self.hi]
        if mine and not self.idle:
            self.local.reset_rows(mine)
        if rows:
            self.lengths[torch.tensor(rows, dtype=torch.int64, device=self.lengths.device)] = 0

    def _gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, in order, on every rank (padded to the largest share for the collective)."""
        dist, world = _dist(), self.model.world
        rows = -(-self.batch_size // world)
        pad = logits.new_zeros(rows, *logits.shape[1:])
        if not self.idle:
            pad[: logits.shape[0]] = logits
        got = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(got, pad.contiguous())
        base, extra = divmod(self.batch_size, world)
        return torch.cat([g[: base + (r < extra)] for r, g in enumerate(got)])


def launch(world: int, argv: list[str]) -> int:
    """Start ``world`` ranks of ``v4c <argv>`` on this machine with torchrun; its exit status."""
    import subprocess
    import sys
    if world < 1:
        raise ValueError(f"--world-size must be >= 1, got {world}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "v4c.cli", *argv]
    return subprocess.call(cmd)
