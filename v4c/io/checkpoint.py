"""A checkpoint: one or more safetensors files seen as one name -> tensor mapping,
and the check that it holds exactly the tensors a model graph expects."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import CheckpointError, WeightMismatchError
from .safetensors import ITEMSIZE, SafetensorsFile, TensorInfo

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """Tensors spread over safetensors files; each file is validated when opened."""

    def __init__(self, path: Path, tensors: dict[str, SafetensorsFile]):
        self.path = path
        self._where = tensors
        self._files = list(dict.fromkeys(tensors.values()))  # each file once, in first-seen order

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Open a directory (sharded with an index, ``model.safetensors``, or loose files) or one file."""
        path = Path(path)
        opened: list[SafetensorsFile] = []

        def load(p: Path) -> SafetensorsFile:
            f = SafetensorsFile(p)
            opened.append(f)
            return f

        try:
            if path.is_file():
                f = load(path)
                return cls(path, {n: f for n in f.names()})
            if not path.is_dir():
                raise CheckpointError(f"{path}: no such file or directory")
            if (path / INDEX).is_file():
                return cls(path, _open_indexed(path, load))
            if (path / SINGLE).is_file():
                f = load(path / SINGLE)
                return cls(path, {n: f for n in f.names()})
            files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
            if not files:
                raise CheckpointError(f"{path}: no safetensors files (no {INDEX}, {SINGLE} or *.safetensors)")
            where: dict[str, SafetensorsFile] = {}
            for p in files:
                f = load(p)
                for n in f.names():
                    if n in where:
                        raise CheckpointError(f"{path}: tensor {n!r} is in both {where[n].path.name} "
                                              f"and {p.name}; without an index the checkpoint is ambiguous")
                    where[n] = f
            return cls(path, where)
        except BaseException:
            for f in opened:
                f.close()
            raise

    def names(self) -> list[str]:
        return sorted(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"{self.path}: checkpoint has no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self._file(name).info(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(name).tensor(name)

    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._files)} files, {len(self._where)} tensors)"


def _open_indexed(root: Path, load) -> dict[str, SafetensorsFile]:
    index = root / INDEX
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{index}: cannot read the index: {e}") from e
    except RecursionError:  # the JSON decoder recurses per nesting level
        raise CheckpointError(f"{index}: cannot read the index: JSON nested too deeply") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{index}: no weight_map object mapping tensor names to shard files")
    by_shard: dict[str, list[str]] = {}
    for name, shard in wmap.items():
        by_shard.setdefault(shard, []).append(name)
    where = {}
    for shard, names in sorted(by_shard.items()):
        rel = PurePosixPath(shard)
        if rel.is_absolute() or ".." in rel.parts:  # the index must not point outside the checkpoint
            raise CheckpointError(f"{index}: shard path {shard!r} leaves the checkpoint directory")
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing (the index maps {len(names)} tensors to it)")
        f = load(p)
        for name in sorted(names):
            if name not in f:
                raise CheckpointError(f"{index}: maps tensor {name!r} to shard {shard}, which does not contain it")
            where[name] = f
    return where


FLOAT_CODES = ("F32", "F16", "BF16", "F64")
INT_CODES = ("I64", "I32")
LIST_LIMIT = 20


@dataclass(frozen=True)
class ExpectedTensor:
    shape: tuple[int, ...]
    kind: str  # "float", "int", or an exact safetensors dtype code

    def __post_init__(self):
        if self.kind not in ("float", "int") and self.kind not in ITEMSIZE:
            raise ValueError(f"ExpectedTensor kind must be 'float', 'int' or a safetensors dtype, got {self.kind!r}")

    def accepts(self, dtype: str) -> bool:
        return dtype in {"float": FLOAT_CODES, "int": INT_CODES}.get(self.kind, (self.kind,))


def _section(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):"] + [f"    {s}" for s in items[:LIST_LIMIT]]
    if len(items) > LIST_LIMIT:
        lines.append(f"    ... and {len(items) - LIST_LIMIT} more")
    return lines


def check_tensors(ckpt: Checkpoint, expected: Mapping[str, ExpectedTensor],
                  ignore_prefixes: tuple[str, ...] = ("mtp.",)) -> None:
    """Raise one WeightMismatchError listing every difference between ``ckpt`` and ``expected``.

    Tensors under ``ignore_prefixes`` (e.g. the multi-token-prediction head the graph
    does not use) may be present without being reported as unexpected.
    """
    missing = sorted(n for n in expected if n not in ckpt)
    unexpected = [n for n in ckpt.names() if n not in expected and not n.startswith(tuple(ignore_prefixes))]
    mismatched, details = [], []
    for name in sorted(n for n in expected if n in ckpt):
        want, got = expected[name], ckpt.info(name)
        if tuple(want.shape) != got.shape or not want.accepts(got.dtype):
            mismatched.append(name)
            details.append(f"{name}: expected shape {tuple(want.shape)} {want.kind}, found {got.shape} {got.dtype}")
    if not (missing or unexpected or mismatched):
        return
    counts = ", ".join(f"{len(v)} {k}" for k, v in
                       (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if v)
    lines = [f"{getattr(ckpt, 'path', 'checkpoint')}: checkpoint does not match the model graph ({counts})"]
    lines += _section("missing", missing) + _section("unexpected", unexpected)
    lines += _section("wrong shape or dtype", details)
    raise WeightMismatchError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)
