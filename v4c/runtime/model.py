"""A loaded artifact: graph + weights, ready to open sessions and generate."""
from __future__ import annotations

import numbers
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from ..errors import ArtifactError
from ..graph.ir import Graph
from ..graph.types import DTYPES
from ..backends import Backend, get_backend
from .executor import Executor
from .sampling import check_sampling, sample
from .session import Session

DEFAULT_MAX_CONTEXT = 16384


class Model:
    """What ``v4c.load`` returns."""

    def __init__(self, path: Path, config: dict, graph: Graph, params: dict[str, torch.Tensor] | None,
                 device: torch.device, manifest: dict, backend: Backend | None = None, cuda_graphs: bool = True):
        self.path = path
        self.config = SimpleNamespace(**config)
        self.config_dict = config
        self.graph = graph
        self.device = device
        self.manifest = manifest
        self.params = params
        backend = backend or get_backend("cpu")
        self.backend = backend.name
        self.cuda_graphs = cuda_graphs  # decode steps on CUDA are captured once and replayed
        self.executor = Executor(graph, params, backend, device.type) if params is not None else None
        self._prefix_cache = None  # made on first use (``prefix_cache``)
        self.mtp = None  # the MTP block (``runtime/mtp.py``) when the artifact has one: speculative decoding
        self.mtp_note = None  # the compile's line on the MTP block (why there is none)

    def implementations(self) -> list[dict]:
        """Per node and phase (decode, prefill): the backend and implementation that run it, and why
        the ones before it declined (what ``v4c inspect --json`` reports as ``implementations``)."""
        if self.executor is None:
            return []
        return self.executor.implementations()

    @property
    def prefix_cache(self):
        """This model's ``PrefixCache`` (``v4c.runtime.prefix_cache``): sequences' states kept by their
        token ids. Made on first use with a memory tier of 1 GiB and no disk tier; assign
        ``PrefixCache.for_model(model, memory_bytes=..., disk_dir=..., disk_bytes=...)`` for others."""
        if self._prefix_cache is None:
            from .prefix_cache import PrefixCache
            self._prefix_cache = PrefixCache.for_model(self)
        return self._prefix_cache

    @prefix_cache.setter
    def prefix_cache(self, cache) -> None:
        self._prefix_cache = cache

    @property
    def runnable(self) -> bool:
        return self.executor is not None

    def new_session(self, batch_size: int = 1, max_context: int | None = None) -> Session:
        if not self.runnable:
            raise ArtifactError(f"{self.path}: weight-free artifact (compiled from a config only); it can be "
                                f"inspected but not run")
        if max_context is None:
            max_context = min(self.config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        return Session(self, batch_size, max_context)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
                 speculative: str | None = None, draft_tokens: int = 2, lengths=None):
        """Append ``max_new_tokens`` sampled tokens to each row of ``ids`` [B, T]; returns [B, T + N].

        ``speculative="mtp"``: the MTP block drafts ``draft_tokens`` (1..3) tokens, one forward of the main
        model verifies them, and the tokens' distribution is plain decoding's (greedy: the same tokens);
        returns a ``SpeculativeOutput`` (``tokens`` [B, T + N], acceptance ``stats``). It also takes
        ``lengths`` [B]: row b's prompt is its first ``lengths[b]`` ids (``v4c.runtime.speculative``)."""
        # every argument is checked before the prefill: a bad one must not cost a whole prompt's compute
        temperature, top_p = check_sampling(temperature, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        if on_token is not None and not callable(on_token):
            raise ValueError(f"on_token must be callable or None, got {on_token!r}")
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if speculative is not None or lengths is not None:
            from .speculative import generate_speculative
            return generate_speculative(self, ids, max_new_tokens, speculative, draft_tokens, temperature, top_p, gen,
                                        on_token, lengths)
        total = ids.shape[1] + max_new_tokens
        session = self.new_session(ids.shape[0], max_context=max(total, 1))
        out = [ids.cpu().long()]
        logits = session.forward(ids, logits="last")
        for step in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_p, gen).cpu()
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if step + 1 < max_new_tokens:
                logits = session.forward(nxt[:, None])
        return torch.cat(out, dim=1)


def cast_param(t: torch.Tensor, dtype: str, device: torch.device) -> torch.Tensor:
    """The checkpoint tensor in the graph's dtype on ``device``; no copy when nothing changes."""
    return t.to(device=device, dtype=DTYPES[dtype])
