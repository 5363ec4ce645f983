"""Artifact manifest: format version, toolchain, target, config, and the hash of every file.

Layout of an artifact directory::

    manifest.json   this file's schema (JSON)
    config.json     the normalised model config
    graph.v4c       the IR text
    weights/        the checkpoint's safetensors files (mode "copy"), absent for "reference"/"none"

Weights in mode "reference" stay where they are; the manifest records their absolute
paths, sizes and the SHA-256 of each file's safetensors header, which pins every
tensor's name, dtype, shape and offset; a full content hash is checked on request.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from ..io.safetensors import sha256_file

FORMAT = "v4c-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def header_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ArtifactError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", prefix)
        return hashlib.sha256(prefix + f.read(min(n, 100 << 20))).hexdigest()


@dataclass(frozen=True)
class Manifest:
    data: dict[str, Any]
    root: Path

    @property
    def weights_mode(self) -> str:
        return self.data["weights"]["mode"]

    @property
    def has_weights(self) -> bool:
        return self.weights_mode != "none"

    def weight_files(self) -> list[Path]:
        w = self.data["weights"]
        if w["mode"] == "copy":
            return [self.root / f for f in w["files"]]
        return [Path(f["path"]) for f in w.get("files", [])]

    def weights_location(self) -> Path | None:
        w = self.data["weights"]
        if w["mode"] == "none":
            return None
        return self.root / "weights" if w["mode"] == "copy" else Path(w["location"])


def read_manifest(root: Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{root}: not a v4c artifact (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {data.get('format_version')!r}, this v4c reads "
                            f"version {FORMAT_VERSION}; recompile the model with this v4c")
    for key in ("files", "weights", "target", "config"):
        if key not in data:
            raise ArtifactError(f"{path}: manifest lacks {key!r}")
    return Manifest(data, root)


def verify_artifact(root: Path, full_weights: bool = False) -> Manifest:
    """Read the manifest and check every file it names against its recorded hash.

    Raises ArtifactError naming each file that is missing, altered or unexpected.
    """
    man = read_manifest(root)
    problems = []
    for rel, digest in sorted(man.data["files"].items()):
        p = man.root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: content differs from the manifest (sha256 {digest[:12]}...)")
    known = set(man.data["files"]) | {MANIFEST}
    for p in sorted(man.root.rglob("*")):
        rel = p.relative_to(man.root).as_posix()
        if p.is_file() and rel not in known:
            problems.append(f"{rel}: not listed in the manifest")
    if man.weights_mode == "reference":
        for f in man.data["weights"]["files"]:
            p = Path(f["path"])
            if not p.is_file():
                problems.append(f"{p}: referenced weight file is missing")
            elif p.stat().st_size != f["size"]:
                problems.append(f"{p}: size {p.stat().st_size} differs from the recorded {f['size']}")
            elif header_sha256(p) != f["header_sha256"]:
                problems.append(f"{p}: safetensors header differs from the one compiled against")
            elif full_weights and sha256_file(p) != f["sha256"]:
                problems.append(f"{p}: content differs from the one compiled against")
    if problems:
        raise ArtifactError(f"{man.root}: artifact does not match its manifest:\n  " + "\n  ".join(problems))
    return man
