"""Compilation targets: where the artifact is meant to run."""
from __future__ import annotations

import torch

TARGETS = ("cpu", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120")


def detect_target() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}"
    return "cpu"


def resolve_target(target: str) -> str:
    """``auto`` becomes this machine's target; anything else must be a known target name."""
    if target == "auto":
        return detect_target()
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose auto or one of {', '.join(TARGETS)}")
    return target
