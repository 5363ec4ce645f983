"""Prometheus' text exposition format for ``GET /metrics``.

The engine counts (``Engine.metrics()``: requests by finish reason, running and waiting, tokens,
latency samples, KV-cache bytes, batch size per step, the prefix cache's hits and tiers, speculative
decoding's drafts and acceptance); the HTTP
layer counts requests by route and status code. Latency samples become cumulative histograms over fixed buckets.
"""
from __future__ import annotations

import math
from typing import Iterable

PREFIX = "v4c"
# the bucket bounds (seconds, sequences) of the engine's histograms, as vLLM's
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(v) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def head(self, name: str, kind: str, help: str) -> str:
        full = f"{PREFIX}_{name}"
        self.lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
        return full

    def sample(self, name: str, value, labels: dict | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_num(value)}")

    def metric(self, name: str, kind: str, help: str, value, labels: dict | None = None) -> None:
        self.sample(self.head(name, kind, help), value, labels)

    def histogram(self, name: str, help: str, samples, buckets: Iterable[float], labels: dict) -> None:
        full = self.head(name, "histogram", help)
        if isinstance(samples, dict) and "buckets" in samples:  # already a histogram: {buckets: {le: n}, sum, count}
            for le, n in samples["buckets"].items():
                self.sample(f"{full}_bucket", n, {**labels, "le": _num(le) if le != "+Inf" else "+Inf"})
            self.sample(f"{full}_sum", samples.get("sum", 0.0), labels)
            self.sample(f"{full}_count", samples.get("count", 0), labels)
            return
        xs = sorted(float(x) for x in (samples or ()) if x is not None and not math.isnan(float(x)))
        i = 0
        for le in buckets:
            while i < len(xs) and xs[i] <= le:
                i += 1
            self.sample(f"{full}_bucket", i, {**labels, "le": _num(le)})
        self.sample(f"{full}_bucket", len(xs), {**labels, "le": "+Inf"})
        self.sample(f"{full}_sum", sum(xs), labels)
        self.sample(f"{full}_count", len(xs), labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _get(m: dict, *names, default=0):
    for n in names:
        if n in m and m[n] is not None:
            return m[n]
    return default


def render(engine_metrics: dict, http_requests: dict[tuple[str, str, int], int], model: str) -> str:
    """The exposition text. ``http_requests``: (method, route, status) -> count."""
    m = engine_metrics or {}
    lab = {"model_name": model}
    w = _Writer()
    full = w.head("http_requests_total", "counter", "HTTP requests by method, route and status code.")
    for (method, route, status), n in sorted(http_requests.items()):
        w.sample(full, n, {"method": method, "route": route, "status": str(status)})
    full = w.head("requests_total", "counter", "Finished generation requests by finish reason "
                                               "(stop, length, cancelled, error).")
    by_reason = _get(m, "requests_total", "requests_by_reason", default={})
    if not isinstance(by_reason, dict):
        by_reason = {"all": by_reason}
    for reason in ("stop", "length", "cancelled", "error"):
        by_reason.setdefault(reason, 0)
    for reason, n in sorted(by_reason.items()):
        w.sample(full, n, {**lab, "finish_reason": reason})
    w.metric("requests_running", "gauge", "Requests holding a batch row now.", _get(m, "running", "num_running"), lab)
    w.metric("requests_waiting", "gauge", "Requests queued for a batch row.", _get(m, "waiting", "num_waiting"), lab)
    w.metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
             _get(m, "prompt_tokens_total", "prompt_tokens"), lab)
    w.metric("generation_tokens_total", "counter", "Generated tokens.",
             _get(m, "generation_tokens_total", "generation_tokens"), lab)
    w.histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.",
                _get(m, "ttft_seconds", "ttft", "ttft_samples", default=()), LATENCY_BUCKETS, lab)
    w.histogram("time_per_output_token_seconds", "Time between generated tokens after the first, per request.",
                _get(m, "tpot_seconds", "tpot", "tpot_samples", default=()), LATENCY_BUCKETS, lab)
    w.histogram("e2e_request_latency_seconds", "Time from arrival to the last token.",
                _get(m, "e2e_seconds", "e2e", "e2e_samples", default=()), LATENCY_BUCKETS, lab)
    w.metric("kv_cache_bytes_in_use", "gauge", "KV-cache bytes held by running requests.",
             _get(m, "kv_cache_bytes_in_use"), lab)
    w.metric("kv_cache_bytes_capacity", "gauge", "KV-cache bytes the engine has allocated for its rows.",
             _get(m, "kv_cache_bytes_capacity"), lab)
    w.histogram("batch_size", "Sequences per engine step.",
                _get(m, "batch_sizes", "batch_size", "batch_size_samples", default=()), BATCH_BUCKETS, lab)
    w.metric("steps_total", "counter", "Engine steps run.", _get(m, "steps_total", "steps"), lab)
    if m.get("prefix_cache"):
        _prefix_cache(w, m["prefix_cache"], lab)
    if m.get("speculative"):
        _speculative(w, m["speculative"], lab)
    return w.text()


def _speculative(w: _Writer, sp: dict, lab: dict) -> None:
    """Speculative decoding's series (``Engine.metrics()["speculative"]``)."""
    w.metric("spec_decode_num_draft_tokens", "gauge", "Tokens the MTP block drafts per row and step (k).",
             sp.get("draft_tokens", 0), lab)
    w.metric("spec_decode_steps_total", "counter", "Verify calls (one per engine step with decoding rows).",
             sp.get("steps", 0), lab)
    w.metric("spec_decode_draft_tokens_total", "counter", "Draft tokens proposed.",
             sp.get("draft_tokens_total", 0), lab)
    w.metric("spec_decode_accepted_tokens_total", "counter", "Draft tokens the main model accepted.",
             sp.get("accepted_tokens_total", 0), lab)
    k = int(sp.get("draft_tokens", 0))
    w.histogram("spec_decode_accepted_per_step", "Draft tokens accepted per row and verify step.",
                sp.get("accepted_per_step", ()), tuple(range(k + 1)), lab)


def _prefix_cache(w: _Writer, pc: dict, lab: dict) -> None:
    """The prefix cache's series (``Engine.metrics()["prefix_cache"]``): per request, per tier."""
    w.metric("prefix_cache_hits_total", "counter", "Requests that resumed from a cached prefix.",
             pc.get("requests_hit", 0), lab)
    w.metric("prefix_cache_misses_total", "counter", "Requests that found no cached prefix.",
             pc.get("requests_missed", 0), lab)
    w.metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens resumed from the cache, not computed.",
             pc.get("hit_tokens", 0), lab)
    w.metric("prefix_cache_miss_tokens_total", "counter", "Prompt tokens computed.", pc.get("miss_tokens", 0), lab)
    w.metric("prefix_cache_errors_total", "counter", "Cache operations that failed (the request went on).",
             pc.get("errors", 0), lab)
    tiers = [(t, pc.get(t)) for t in ("memory", "disk") if pc.get(t)]
    for key, name, kind, help in (
            ("bytes", "prefix_cache_bytes", "gauge", "Bytes held by the prefix cache, by tier."),
            ("capacity", "prefix_cache_capacity_bytes", "gauge", "The prefix cache's byte budget, by tier."),
            ("entries", "prefix_cache_entries", "gauge", "Snapshots held, by tier."),
            ("evictions", "prefix_cache_evictions_total", "counter", "Snapshots evicted to stay within the budget.")):
        full = w.head(name, kind, help)
        for tier, s in tiers:
            w.sample(full, s.get(key, 0), {**lab, "tier": tier})
    disk = pc.get("disk")
    if disk:
        full = w.head("prefix_cache_disk_files_ignored_total", "counter",
                      "Disk cache files not used: corrupt or truncated, written by another artifact, or missing a "
                      "block.")
        for reason in ("corrupt", "foreign", "missing"):
            w.sample(full, disk.get(reason, 0), {**lab, "reason": reason})
        w.metric("prefix_cache_disk_reads_total", "counter", "Snapshots read back from disk.", disk.get("reads", 0),
                 lab)
        w.metric("prefix_cache_disk_writes_total", "counter", "Snapshots written to disk.", disk.get("writes", 0),
                 lab)
        w.metric("prefix_cache_disk_write_errors_total", "counter", "Snapshot writes that failed.",
                 disk.get("write_errors", 0), lab)
