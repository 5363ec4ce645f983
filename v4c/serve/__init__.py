"""``v4c serve``: continuous batching over one session (``engine``), and an OpenAI-compatible HTTP layer.

``Engine`` works without any HTTP package: ``Engine(model).submit(prompt_ids, SamplingParams(...))``."""
from .engine import Engine
from .requests import Completion, Finished, QueueFullError, RequestHandle, SamplingParams, TokenEvent

__all__ = ["Completion", "Engine", "Finished", "QueueFullError", "RequestHandle", "SamplingParams", "TokenEvent"]
