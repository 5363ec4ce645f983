"""Artifact manifest: format version, toolchain, target, config, and the hash of every file; and the
artifact's one reader (``open_artifact`` -> ``Artifact``).

Layout of an artifact directory (the names live in ``layout.py``; ``writer.py`` lays them out)::

    manifest.json   this file's schema (JSON), sealed by its own digest (``manifest_sha256``)
    config.json     the normalised model config
    graph.v4c       the IR text
    mtp.v4c         the MTP block's IR text, when it was compiled (``mtp``)
    ranks/          each rank's graph of a sharded artifact (``parallel``)
    kernels/        the rendered Triton modules (``kernels.modules``)
    aot/            ahead-of-time compiled kernel binaries (``aot.binaries``)
    tokenizer.json  the checkpoint's tokenizer, when it has one
    weights/        the checkpoint's safetensors files (mode "copy"), absent for "reference"/"none"

``manifest_sha256`` is the SHA-256 of the manifest's canonical JSON (sorted keys, no whitespace)
without that key. Reading checks it before anything else in the manifest is used, so an edited or
corrupted manifest (another dtype, target, kernel meta, file hash) is refused. It is a checksum,
not a signature: whoever can rewrite manifest.json can recompute it.

Every path in the manifest (file hashes, config, graph, kernel modules, AOT binaries, rank graphs,
copied weights) is relative, normalised, and inside the artifact once symlinks are resolved; the
runtime reads each such file only through ``Artifact`` (``read_bytes`` and the accessors built on it,
``read_kernel_module``, ``aot_binaries``), which checks its hash first.

Weights in mode "reference" stay where they are; the manifest records their absolute
paths, sizes and the SHA-256 of each file's safetensors header, which pins every
tensor's name, dtype, shape and offset; a full content hash is checked on request. The
loader opens exactly those files (``open_weights``), never an index or a shard found beside them.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from ..errors import ArtifactError
from ..io.safetensors import sha256_file
from .layout import MANIFEST, TOKENIZER, WEIGHTS

FORMAT = "v4c-artifact"
FORMAT_VERSION = 1
DIGEST = "manifest_sha256"  # the manifest's own checksum, a key of the manifest
_HEX64 = re.compile(r"[0-9a-f]{64}")
WEIGHT_MODES = ("copy", "reference", "none")


def header_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ArtifactError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", prefix)
        return hashlib.sha256(prefix + f.read(min(n, 100 << 20))).hexdigest()


def manifest_digest(data: dict) -> str:
    """SHA-256 of ``data``'s canonical JSON, its ``manifest_sha256`` key left out."""
    body = {k: v for k, v in data.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                     allow_nan=True).encode()).hexdigest()


def _is_temp(rel: str) -> bool:
    """A manifest writer's temporary file (``.manifest.json.<random>.tmp``, or the fixed name older
    versions of ``v4c tune`` used): left by a killed writer, never read, so not a foreign file."""
    return "/" not in rel and rel.startswith(f".{MANIFEST}.") and rel.endswith(".tmp")


def check_rel(rel: Any, field: str, where: Path | str = "manifest") -> str:
    """``rel`` as a manifest path: a relative, normalised POSIX path with no ``..``; else ArtifactError."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{where}: {field} must be a relative path (a non-empty string), got {rel!r:.100}")
    parts = rel.split("/")
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or "\\" in rel or "\0" in rel
            or any(p in ("", ".", "..") for p in parts)):
        raise ArtifactError(f"{where}: {field} {rel!r:.200} is not a normalised relative path inside the artifact; "
                            f"refusing it")
    return rel


def artifact_path(root: Path, rel: Any, field: str = "path") -> Path:
    """``root / rel`` once ``rel`` is a manifest path that stays inside ``root`` with symlinks resolved."""
    root = Path(root)
    check_rel(rel, field, root / MANIFEST)
    p = root / rel
    base = root.resolve()
    real = p.resolve()
    if real != base and base not in real.parents:
        raise ArtifactError(f"{root / MANIFEST}: {field} {rel!r} resolves to {real}, outside the artifact; "
                            f"refusing it")
    return p


@dataclass(frozen=True)
class Artifact:
    """An artifact as its manifest describes it (digest and schema checked when it was read): the
    fields of the manifest, and every file of the artifact, each read against its hash right before
    it is returned. ``open_artifact`` gives one; nothing outside this package reads the manifest's
    keys or the artifact's paths."""
    data: dict[str, Any]
    root: Path

    # ---------------------------------------------------------------------- the manifest's fields
    @property
    def format_version(self) -> int:
        return self.data["format_version"]

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def toolchain(self) -> dict | None:
        return copy.deepcopy(self.data.get("toolchain"))

    @property
    def passes(self) -> list | None:
        return copy.deepcopy(self.data.get("passes"))

    @property
    def kv_cache(self) -> str | None:
        return self.data.get("kv_cache")

    @property
    def indexer_cache(self) -> str | None:
        return self.data.get("indexer_cache")

    @property
    def files(self) -> dict[str, str]:
        """Every file of the artifact (relative path) -> its SHA-256."""
        return dict(self.data["files"])

    @property
    def weights_mode(self) -> str:
        return self.data["weights"]["mode"]

    @property
    def has_weights(self) -> bool:
        return self.weights_mode != "none"

    def kernels(self) -> dict:
        """The kernel table (``modules``, ``ops``, per-call-site ``sites`` with their per-bucket configs,
        ``buckets``, ``context``): a copy, ``{}`` when the artifact has none."""
        return copy.deepcopy(self.data.get("kernels") or {})

    def aot(self) -> dict | None:
        """The ahead-of-time compile's record (target, toolchain, launches, binaries), or None."""
        return copy.deepcopy(self.data.get("aot"))

    def parallel(self) -> dict | None:
        """The multi-GPU plan (``world_size``, ``ep``, ``attn``, and per rank its ``param_bytes`` and
        ``shards``), or None for a single-GPU artifact. Each rank's graph: ``graph(rank=r)``."""
        par = self.data.get("parallel")
        if par is None:
            return None
        out = copy.deepcopy(par)
        for e in out["ranks"]:
            e.pop("graph", None)  # a path: read it through graph(rank=...)
        return out

    @property
    def world_size(self) -> int:
        par = self.data.get("parallel")
        return par["world_size"] if par else 1

    def state_identity(self) -> str:
        """SHA-256 of what decides a sequence's decode state, for keys of states kept beyond one process
        (the prefix cache): the config, the graph (its states and their cache formats), the weights'
        hashes, the dtype and cache formats. Not the kernels' configs nor the manifest's date, so a
        re-tune or a recompile of the same model keeps its cached states."""
        d, files = self.data, self.data["files"]
        w = d["weights"]
        weights = ([files[f] for f in w.get("files", [])] if w["mode"] == "copy"
                   else [f["sha256"] for f in w.get("files", [])])
        body = {"format": FORMAT, "config": files[d["config"]], "graph": files[d["graph"]], "weights": weights,
                "dtype": d.get("dtype"), "kv_cache": d.get("kv_cache"), "indexer_cache": d.get("indexer_cache"),
                "world_size": self.world_size}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # --------------------------------------------------------------------------- the files, checked
    def config(self) -> dict:
        """The normalised model config."""
        return self.read_json(self.data["config"])

    def graph_text(self, rank: int | None = None) -> str:
        """The IR text of the graph, or of rank ``rank``'s graph of a sharded artifact."""
        return self.read_text(self._graph_rel(rank))

    def graph(self, rank: int | None = None):
        """The graph (parsed, not verified), or rank ``rank``'s of a sharded artifact."""
        from ..graph.text import parse_graph
        return parse_graph(self.graph_text(rank))

    def mtp_graph_text(self) -> str | None:
        """The MTP block's IR text, or None when the artifact has none (``mtp_note`` says why)."""
        rel = (self.data.get("mtp") or {}).get("graph")
        return self.read_text(rel) if rel is not None else None

    @property
    def mtp_note(self) -> str | None:
        """The compile's line on the MTP block: compiled, or why not (None for artifacts of older v4c)."""
        return (self.data.get("mtp") or {}).get("note")

    def _graph_rel(self, rank: int | None) -> str:
        if rank is None:
            return self.data["graph"]
        par = self.data.get("parallel")
        if not par:
            raise ArtifactError(f"{self.root}: not a sharded artifact: it has no rank graphs")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(par["ranks"]):
            raise ArtifactError(f"{self.root}: no rank {rank!r}: compiled for {par['world_size']} rank(s)")
        return par["ranks"][rank]["graph"]

    def tokenizer(self) -> str | None:
        """The tokenizer's JSON text, or None when the checkpoint had no tokenizer."""
        return self.read_text(TOKENIZER) if TOKENIZER in self.data["files"] else None

    def open_weights(self):
        """The artifact's checkpoint (see ``open_weights``); None when it has no weights."""
        return open_weights(self)

    def path(self, rel: str, field: str = "path") -> Path:
        return artifact_path(self.root, rel, field)

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of the artifact file ``rel``, after they match the hash the manifest lists for it
        (these very bytes: a file changed after the check is never used)."""
        want = self.data["files"].get(rel)
        if want is None:
            raise ArtifactError(f"{self.root}: {rel!r} is not listed in the manifest's files; refusing to read it")
        p = self.path(rel)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ArtifactError(f"{self.root}: {rel}: cannot read: {e.strerror or e}") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise ArtifactError(f"{self.root}: {rel}: content differs from the manifest (sha256 {want[:12]}...)")
        return data

    def read_text(self, rel: str) -> str:
        try:
            return self.read_bytes(rel).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{self.root}: {rel}: not UTF-8 text ({e.reason})") from None

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_text(rel))
        except (ValueError, RecursionError) as e:
            raise ArtifactError(f"{self.root}: {rel}: not valid JSON ({e})") from None

    def weight_files(self) -> list[Path]:
        w = self.data["weights"]
        if w["mode"] == "copy":
            return [self.root / f for f in w["files"]]
        return [Path(f["path"]) for f in w.get("files", [])]

    def weights_location(self) -> Path | None:
        w = self.data["weights"]
        if w["mode"] == "none":
            return None
        return self.root / WEIGHTS if w["mode"] == "copy" else Path(w["location"])


Manifest = Artifact  # the earlier name


def read_kernel_module(root: Path, family: str, entry: dict) -> tuple[Path, bytes]:
    """Path and bytes of the kernel module ``entry`` (``kernels.modules[family]``: its file and SHA-256),
    once the path stays inside the artifact and these bytes match the entry's hash: what is executed
    is what was checked, never what the file holds a moment later."""
    path = artifact_path(root, entry["file"], f"kernels.modules[{family!r}].file")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:  # checked again right before executing it
        raise ArtifactError(f"{path}: kernel source does not match its manifest hash; refusing to import it")
    return path, data


def aot_binaries(root: Path, aot: dict | None, files: dict | None = None):
    """For each ahead-of-time binary of ``aot`` (``aot.binaries``): its Triton cache key, its file names,
    and a function reading one of them, inside the artifact and, with ``files`` (the manifest's path ->
    sha256), only when its bytes match their hash (those bytes, read once, are returned)."""
    for key, b in ((aot or {}).get("binaries") or {}).items():
        def read(name: str, key=key, b=b) -> bytes:
            rel = f"{b['dir']}/{name}"
            data = artifact_path(root, rel, f"aot.binaries[{key!r}]").read_bytes()
            if files is not None and hashlib.sha256(data).hexdigest() != files.get(rel):
                raise ArtifactError(f"{root}: {rel}: AOT binary does not match its manifest hash; refusing to "
                                    f"install it")
            return data
        yield key, list(b["files"]), read


# ----------------------------------------------------------------------------------------- schema

class _Schema:
    """Type checks of a manifest's fields; each failure names the field and what it should be."""

    def __init__(self, where: Path):
        self.where = where

    def fail(self, field: str, what: str, got: Any = ...) -> None:
        tail = "" if got is ... else f", got {got!r:.100}"
        raise ArtifactError(f"{self.where}: malformed manifest: {field} must be {what}{tail}")

    def get(self, obj: dict, key: str, field: str, typ, what: str, optional: bool = False):
        if key not in obj:
            if optional:
                return None
            raise ArtifactError(f"{self.where}: malformed manifest: lacks {field}")
        v = obj[key]
        if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool and bool not in _tuple(typ)):
            self.fail(field, what, v)
        return v

    def hex64(self, v, field: str) -> str:
        if not isinstance(v, str) or not _HEX64.fullmatch(v):
            self.fail(field, "a SHA-256 (64 lowercase hex digits)", v)
        return v

    def listed(self, files: dict, rel, field: str) -> str:
        check_rel(rel, field, self.where)
        if rel not in files:
            raise ArtifactError(f"{self.where}: {field} {rel!r} is not listed in the manifest's files (its hash "
                                f"is unknown); refusing it")
        return rel


def _tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def check_schema(data: dict, where: Path) -> None:
    """Raise ArtifactError naming the first field of ``data`` that is missing, of the wrong type,
    or a path that is not a listed file inside the artifact."""
    s = _Schema(where)
    files = s.get(data, "files", "files", dict, "an object of path -> sha256")
    for rel, digest in files.items():
        check_rel(rel, f"files key", where)
        s.hex64(digest, f"files[{rel!r}]")
    for key in ("target", "dtype"):
        s.get(data, key, key, str, "a string")
    s.listed(files, s.get(data, "config", "config", str, "a path"), "config")
    s.listed(files, s.get(data, "graph", "graph", str, "a path"), "graph")
    s.get(data, "toolchain", "toolchain", dict, "an object", optional=True)
    s.get(data, "passes", "passes", list, "a list", optional=True)
    _check_weights(s, data, files)
    _check_kernels(s, data, files)
    _check_aot(s, data, files)
    _check_parallel(s, data, files)
    _check_mtp(s, data, files)


def _check_weights(s: _Schema, data: dict, files: dict) -> None:
    w = s.get(data, "weights", "weights", dict, "an object")
    mode = w.get("mode")
    if mode not in WEIGHT_MODES:
        s.fail("weights.mode", "one of " + ", ".join(WEIGHT_MODES), mode)
    if mode == "copy":
        for i, rel in enumerate(s.get(w, "files", "weights.files", list, "a list of paths")):
            s.listed(files, rel, f"weights.files[{i}]")
    elif mode == "reference":
        loc = s.get(w, "location", "weights.location", str, "an absolute path")
        if not os.path.isabs(loc):
            s.fail("weights.location", "an absolute path", loc)
        for i, f in enumerate(s.get(w, "files", "weights.files", list, "a list of objects")):
            field = f"weights.files[{i}]"
            if not isinstance(f, dict):
                s.fail(field, "an object", f)
            p = s.get(f, "path", f"{field}.path", str, "an absolute path")
            if not os.path.isabs(p) or os.path.normpath(p) != p:
                s.fail(f"{field}.path", "an absolute, normalised path", p)
            size = s.get(f, "size", f"{field}.size", int, "an integer")
            if size < 0:
                s.fail(f"{field}.size", "a non-negative integer", size)
            s.hex64(f.get("header_sha256"), f"{field}.header_sha256")
            s.hex64(f.get("sha256"), f"{field}.sha256")
            names = s.get(f, "tensors", f"{field}.tensors", list, "a list of tensor names", optional=True)
            if names is not None and not all(isinstance(n, str) for n in names):
                s.fail(f"{field}.tensors", "a list of tensor names (strings)", names)


def _check_kernels(s: _Schema, data: dict, files: dict) -> None:
    k = s.get(data, "kernels", "kernels", dict, "an object", optional=True)
    if k is None:
        return
    modules = s.get(k, "modules", "kernels.modules", dict, "an object", optional=True) or {}
    for fam, m in modules.items():
        field = f"kernels.modules[{fam!r}]"
        if not isinstance(m, dict):
            s.fail(field, "an object", m)
        s.listed(files, s.get(m, "file", f"{field}.file", str, "a path"), f"{field}.file")
        s.hex64(m.get("sha256"), f"{field}.sha256")

    def module_ref(v, field):
        if v is not None and v not in modules:
            s.fail(field, "null or one of kernels.modules (" + ", ".join(sorted(modules)) + ")", v)

    from .shapes import parse_bucket
    sites = s.get(k, "sites", "kernels.sites", dict, "an object", optional=True) or {}
    for sid, site in sites.items():
        field = f"kernels.sites[{sid!r}]"
        if not isinstance(site, dict):
            s.fail(field, "an object", site)
        s.get(site, "op", f"{field}.op", str, "a string")
        module_ref(site.get("module"), f"{field}.module")
        if site.get("module") is not None:
            s.get(site, "launcher", f"{field}.launcher", str, "a string")
            s.get(site, "kernel", f"{field}.kernel", str, "a string")
        ti = site.get("tokens_input")
        if ti is not None and (not isinstance(ti, int) or isinstance(ti, bool)):
            s.fail(f"{field}.tokens_input", "null or an integer", ti)
        for bkey, c in (s.get(site, "configs", f"{field}.configs", dict, "an object", optional=True) or {}).items():
            cf = f"{field}.configs[{bkey!r}]"
            try:
                parse_bucket(bkey)
            except ValueError as e:
                s.fail(f"{field}.configs key", f"a shape bucket ({e})", bkey)
            if not isinstance(c, dict):
                s.fail(cf, "an object", c)
            if c.get("config_source") != "reference":
                s.get(c, "meta", f"{cf}.meta", dict, "an object")
    for op, spec in (s.get(k, "ops", "kernels.ops", dict, "an object", optional=True) or {}).items():
        field = f"kernels.ops[{op!r}]"
        if not isinstance(spec, dict):
            s.fail(field, "an object", spec)
        if "meta" in spec:  # null where the first site runs on the reference (an AOT fallback)
            s.get(spec, "meta", f"{field}.meta", (dict, type(None)), "an object or null")
            if spec.get("module") not in modules:
                s.fail(f"{field}.module", "one of kernels.modules", spec.get("module"))
        q = s.get(spec, "quantized", f"{field}.quantized", dict, "an object", optional=True)
        if q:
            module_ref(q.get("module"), f"{field}.quantized.module")
            if q.get("module") is not None:
                s.get(q, "meta", f"{field}.quantized.meta", (dict, type(None)), "an object or null")
    b = s.get(k, "buckets", "kernels.buckets", list, "a list of shape buckets", optional=True)
    for key in b or ():
        try:
            parse_bucket(key)
        except ValueError as e:
            s.fail("kernels.buckets", f"a list of shape buckets ({e})", b)
    ctx = k.get("context")
    if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1):
        s.fail("kernels.context", "null or a positive integer", ctx)


def _check_aot(s: _Schema, data: dict, files: dict) -> None:
    aot = s.get(data, "aot", "aot", dict, "an object", optional=True)
    if not aot:
        return
    for key, b in (s.get(aot, "binaries", "aot.binaries", dict, "an object", optional=True) or {}).items():
        field = f"aot.binaries[{key!r}]"
        if not isinstance(b, dict):
            s.fail(field, "an object", b)
        d = check_rel(s.get(b, "dir", f"{field}.dir", str, "a path"), f"{field}.dir", s.where)
        for i, f in enumerate(s.get(b, "files", f"{field}.files", list, "a list of file names")):
            s.listed(files, f"{d}/{check_rel(f, f'{field}.files[{i}]', s.where)}", f"{field}.files[{i}]")


def _check_mtp(s: _Schema, data: dict, files: dict) -> None:
    m = s.get(data, "mtp", "mtp", dict, "an object", optional=True)
    if m is None:
        return
    rel = s.get(m, "graph", "mtp.graph", (str, type(None)), "a path or null", optional=True)
    if rel is not None:
        s.listed(files, rel, "mtp.graph")
    s.get(m, "note", "mtp.note", str, "a string", optional=True)


def _check_parallel(s: _Schema, data: dict, files: dict) -> None:
    par = s.get(data, "parallel", "parallel", dict, "an object", optional=True)
    if par is None:
        return
    world = s.get(par, "world_size", "parallel.world_size", int, "a positive integer")
    s.get(par, "attn", "parallel.attn", str, "a string")
    ranks = s.get(par, "ranks", "parallel.ranks", list, "a list")
    if world < 1 or len(ranks) != world:
        s.fail("parallel.ranks", f"a list of world_size ({world}) entries", f"{len(ranks)} entries")
    for r, e in enumerate(ranks):
        if not isinstance(e, dict):
            s.fail(f"parallel.ranks[{r}]", "an object", e)
        s.listed(files, s.get(e, "graph", f"parallel.ranks[{r}].graph", str, "a path"), f"parallel.ranks[{r}].graph")


# ---------------------------------------------------------------------------------- read / write

def _parse(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not valid JSON (nested too deeply)") from None


def read_manifest(root: Path) -> Artifact:
    """The artifact's manifest, once its digest matches and every field has the right type and every
    path stays inside the artifact; ArtifactError naming the problem otherwise."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{root}: not a v4c artifact (no {MANIFEST})")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read: {e.strerror or e}") from None
    data = _parse(raw, path)
    # format and version first: they say how to read the rest (the digest included)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {data.get('format_version')!r}, this v4c reads "
                            f"version {FORMAT_VERSION}; recompile the model with this v4c")
    if DIGEST not in data:
        raise ArtifactError(f"{path}: the manifest has no digest ({DIGEST}): it was written by an older v4c; "
                            f"recompile the model with this v4c")
    if data[DIGEST] != manifest_digest(data):
        raise ArtifactError(f"{path}: the manifest does not match its digest ({DIGEST}): it was edited or "
                            f"corrupted after v4c wrote it; recompile the model")
    check_schema(data, path)
    return Artifact(data, root)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_manifest(root: Path, data: dict) -> dict:
    """Seal ``data`` with its digest and write it as ``root/manifest.json`` atomically: a unique
    temporary file beside it, renamed over it, so a reader sees the old manifest or the new one,
    never part of one. Returns the sealed data. Callers that may race take ``manifest_lock``."""
    root = Path(root)
    data = {k: v for k, v in data.items() if k != DIGEST}
    data[DIGEST] = manifest_digest(data)
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    dest = root / MANIFEST
    try:
        mode = dest.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600; keep the manifest readable as before
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


@contextlib.contextmanager
def manifest_lock(root: Path):
    """Exclusive lock of the artifact's manifest across processes (flock on the directory itself:
    no lock file is left in the artifact)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): writers are not serialised there
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def update_manifest(root: Path, edit: Callable[[dict], None]) -> Artifact:
    """Under ``manifest_lock``: read the current manifest (digest checked), let ``edit`` change a copy
    in place, and write it back sealed. Concurrent updaters each see the others' changes."""
    root = Path(root)
    with manifest_lock(root):
        data = copy.deepcopy(read_manifest(root).data)
        edit(data)
        check_schema(data, root / MANIFEST)  # never seal a manifest that would not load
        return Artifact(write_manifest(root, data), root)


# ----------------------------------------------------------------------------------------- verify

def _reference_problem(p: Path, f: dict, full: bool) -> str | None:
    """Why the referenced weight file ``p`` is not the one compiled against, or None."""
    if not p.is_file():
        return f"{p}: referenced weight file is missing"
    size = p.stat().st_size
    if size != f["size"]:
        return f"{p}: size {size} differs from the recorded {f['size']}"
    try:
        if header_sha256(p) != f["header_sha256"]:
            return f"{p}: safetensors header differs from the one compiled against"
    except ArtifactError as e:
        return str(e)
    if full and sha256_file(p) != f["sha256"]:
        return f"{p}: content differs from the one compiled against"
    return None


def verify_artifact(root: Path, full_weights: bool = False) -> Artifact:
    """Read the manifest and check every file it names against its recorded hash.

    Raises ArtifactError naming each file that is missing, altered, outside the artifact or unexpected.
    """
    man = read_manifest(root)
    problems = []
    for rel, digest in sorted(man.data["files"].items()):
        p = man.root / rel
        real = p.resolve()
        if real != man.root.resolve() and man.root.resolve() not in real.parents:
            problems.append(f"{rel}: resolves to {real}, outside the artifact; refusing it")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: content differs from the manifest (sha256 {digest[:12]}...)")
    known = set(man.data["files"]) | {MANIFEST}
    for p in sorted(man.root.rglob("*")):
        rel = p.relative_to(man.root).as_posix()
        if p.is_file() and rel not in known and not _is_temp(rel):
            problems.append(f"{rel}: not listed in the manifest")
    if man.weights_mode == "reference":
        for f in man.data["weights"]["files"]:
            why = _reference_problem(Path(f["path"]), f, full_weights)
            if why:
                problems.append(why)
    if problems:
        raise ArtifactError(f"{man.root}: artifact does not match its manifest:\n  " + "\n  ".join(problems))
    return man


def open_artifact(path, full_weights: bool = False, verify: bool = True) -> Artifact:
    """The artifact at ``path``: its manifest read (digest and schema checked) and, with ``verify``,
    every file checked against its hash first (``verify_artifact``; ``full_weights``: referenced
    weights by their whole content too). Every file read through it is checked again right before use."""
    return verify_artifact(Path(path), full_weights=full_weights) if verify else read_manifest(Path(path))


# ---------------------------------------------------------------------------------------- weights

def reference_entries(ckpt) -> list[dict]:
    """The manifest's ``weights.files`` for a checkpoint kept in place: each file's absolute path, size,
    header hash and content hash, and, where the checkpoint takes only some of a file's tensors (an
    index chose among files), the names it takes: the layout the loader rebuilds without the index."""
    taken: dict = {}
    for n in ckpt.names():
        taken.setdefault(ckpt._file(n), []).append(n)  # the checkpoint's own name -> file choice
    out = []
    for f in dict.fromkeys(taken):
        p = Path(f.path)
        e = {"path": str(p.resolve()), "size": p.stat().st_size, "header_sha256": header_sha256(p),
             "sha256": sha256_file(p)}
        if sorted(taken[f]) != f.names():
            e["tensors"] = sorted(taken[f])
        out.append(e)
    return out


def open_weights(man: Artifact):
    """The artifact's checkpoint, opened from exactly the files the manifest names (None when it has
    no weights). Copied weights are read from ``weights/``, every file of which is hashed in the
    manifest; referenced weights from their recorded paths, each checked for its size and header
    hash right after it is opened, with the recorded tensor -> file layout (never an index or a shard
    that appeared next to them since)."""
    from ..io.checkpoint import Checkpoint
    from ..io.safetensors import SafetensorsFile
    w = man.data["weights"]
    if w["mode"] == "none":
        return None
    if w["mode"] == "copy":
        return Checkpoint.open(man.path(WEIGHTS, "weights directory"))
    opened, where = [], {}
    try:
        for f in w["files"]:
            p = Path(f["path"])
            sf = SafetensorsFile(p)
            opened.append(sf)
            why = _reference_problem(p, f, False)  # after opening: the header read is the one pinned
            if why:
                raise ArtifactError(f"{man.root}: {why}")
            for n in f.get("tensors", sf.names()):
                if n not in sf:
                    raise ArtifactError(f"{man.root}: the manifest maps tensor {n!r} to {p}, which lacks it")
                if n in where:
                    raise ArtifactError(f"{man.root}: tensor {n!r} is in both {where[n].path} and {p}, and the "
                                        f"manifest does not say which to use; recompile the model")
                where[n] = sf
        return Checkpoint(Path(w["location"]), where)
    except BaseException:
        for sf in opened:
            sf.close()
        raise
