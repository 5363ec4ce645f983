"""A validating, zero-copy safetensors reader, an atomic writer, and file hashing.

The header is checked in full when the file is opened, so a corrupt or truncated
file fails with a message naming the file and the problem instead of crashing
(or reading garbage) later. Tensors are views of one private copy-on-write
mapping per file: no bytes are copied, and writing to a tensor never touches the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import reprlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

MAX_HEADER = 100_000_000  # the reference implementation's limit; real headers are a few MB
MAX_DIM = (1 << 63) - 1  # torch sizes are int64: a larger dimension cannot even describe an empty tensor

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}

TORCH_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    # older torch lacks e8m0: hand out the raw exponent bytes
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", torch.uint8),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DIM


# messages quote header values: bounded, so a huge or deeply nested value cannot flood (or overflow) repr
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 120, 80, 8, 8
_show = _REPR.repr


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {_show(k)}")
        d[k] = v
    return d


class SafetensorsFile:
    """One safetensors file; ``CheckpointError`` on open if anything in it is inconsistent."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                if len(head) < 8:
                    self._fail(f"too small to be a safetensors file ({size} bytes)")
                if 8 + n > size:
                    self._fail(f"header length {n} is larger than the file ({size} bytes)")
                if n > MAX_HEADER:
                    self._fail(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from e
        self._data_start = 8 + n
        self.metadata, self._infos = self._parse_header(raw, size - self._data_start)

    def _fail(self, problem: str):
        raise CheckpointError(f"{self.path}: {problem}")

    def _parse_header(self, raw: bytes, available: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except UnicodeDecodeError as e:
            self._fail(f"header is not valid UTF-8 ({e.reason} at byte {e.start})")
        except ValueError as e:  # JSONDecodeError and duplicate keys
            self._fail(f"header is not valid JSON: {e}")
        except RecursionError:  # the decoder recurses per nesting level; real headers nest 3 deep
            self._fail("header is nested too deeply to be a safetensors header")
        if not isinstance(header, dict):
            self._fail(f"header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self._fail("__metadata__ must map strings to strings")
        infos = {}
        for name, e in header.items():
            tensor = f"tensor {_show(name)}"
            if not isinstance(e, dict):
                self._fail(f"{tensor}: entry is not an object")
            dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
            if not isinstance(dtype, str) or dtype not in ITEMSIZE:  # a list is unhashable: check the type first
                self._fail(f"{tensor}: unknown dtype {_show(dtype)}")
            if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
                self._fail(f"{tensor}: shape {_show(shape)} is not a list of non-negative integers below 2**63")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)
                    and offs[0] <= offs[1]):
                self._fail(f"{tensor}: data_offsets {_show(offs)} is not a valid [begin, end] byte range")
            nbytes = offs[1] - offs[0]
            want = math.prod(shape) * ITEMSIZE[dtype]
            if nbytes != want:
                self._fail(f"{tensor}: data_offsets {offs} span {nbytes} bytes, but shape {_show(tuple(shape))} "
                           f"of {dtype} needs {want}")
            infos[name] = TensorInfo(name, dtype, tuple(shape), self._data_start + offs[0], nbytes)
        # overlapping tensors would alias each other's bytes; safetensors files never do that
        spans = sorted(infos.values(), key=lambda t: (t.offset, t.nbytes))
        for a, b in zip(spans, spans[1:]):
            if b.offset < a.offset + a.nbytes:
                self._fail(f"tensors {_show(a.name)} and {_show(b.name)} overlap in the data section")
        if spans:
            last = max(spans, key=lambda t: t.offset + t.nbytes)
            need = last.offset + last.nbytes - self._data_start
            if need > available:
                self._fail(f"truncated: header says {need} data bytes, file has {available} "
                           f"(tensor {_show(last.name)} ends past the end)")
        return metadata, infos

    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            try:
                with open(self.path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:  # ValueError: the file is now empty
                raise CheckpointError(f"{self.path}: cannot map: {e}") from e
            # the header was checked against the file as it was; reading past a shrunk file would SIGBUS
            end = max((t.offset + t.nbytes for t in self._infos.values()), default=0)
            if len(mm) < end:
                mm.close()
                self._fail(f"file shrank to {len(mm)} bytes since it was opened (needs {end})")
            self._mmap = mm
        return self._mmap

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy, writable view of the tensor; writes stay private to this process."""
        t = self.info(name)
        dtype = TORCH_DTYPE[t.dtype]
        if t.nbytes == 0:  # frombuffer rejects empty ranges
            return torch.empty(t.shape, dtype=dtype)
        count = t.nbytes // ITEMSIZE[t.dtype]
        mm = self._map()
        if t.offset % ITEMSIZE[t.dtype]:  # hand-made files may misalign; a copy is safer than a bad view
            return torch.frombuffer(bytearray(mm[t.offset:t.offset + t.nbytes]), dtype=dtype).view(t.shape)
        # frombuffer keeps a reference to the mmap object, so the tensor outlives close()
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=t.offset).view(t.shape)

    def close(self) -> None:
        # Only drop our reference: frombuffer does not pin the buffer, so mmap.close() would
        # unmap memory that live tensors still point into. The tensors each hold a reference
        # to the mmap object; the mapping goes away when the last of them (or we) let go.
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._infos)} tensors)"


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically: a crash leaves the old file or none, never half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:  # save_file refuses tensors that share storage
            t = t.clone()
        seen.add(key)
        out[name] = t
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(out, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces (weights can be far larger than memory)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
