"""The artifact's one writer: ``ArtifactWriter`` lays a new artifact out (``v4c compile``, sharded or not)
and ``update_kernels`` changes the kernel table of an existing one (``v4c tune``).

A new artifact is written into a private partial directory beside its output (``output.py``); ``commit``
hashes every file, seals the manifest with its digest and renames the directory into place, so a reader
sees the old artifact or the new one, never part of one. Leaving the ``with`` block without a commit (an
exception, an interrupt) removes the partial directory. Callers hand over contents (config, graph text,
kernel table, rank plan, weights); the names they get in the artifact and the manifest's keys are this
package's (``layout.py``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ArtifactError
from ..io.safetensors import sha256_file
from .layout import CONFIG, GRAPH, MANIFEST, MTP_GRAPH, TOKENIZER, WEIGHTS, aot_dir, rank_graph, weight_file
from .manifest import (FORMAT, FORMAT_VERSION, Artifact, check_rel, check_schema, reference_entries,
                       update_manifest, write_manifest)
from .output import discard_partial, partial_dir, put_in_place, remove_stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def put_aot_binary(root: Path, key: str, files: Iterable[str | os.PathLike]) -> dict:
    """Copy one launch's Triton cache entry (kernel metadata JSON and cubin) into the artifact being
    written at ``root``; returns its ``aot.binaries`` entry (directory and file names)."""
    rel = check_rel(aot_dir(key), f"aot.binaries[{key!r}].dir", Path(root) / MANIFEST)
    dest = Path(root) / rel
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for f in files:
        p = Path(f)
        shutil.copyfile(p, dest / p.name)
        names.append(p.name)
    return {"dir": rel, "files": sorted(names)}


class ArtifactWriter:
    """A new artifact at ``output``, laid out in a partial directory (``root``) until ``commit``.

    ``output`` must have been cleared for writing first (``output.check_output``: ``--force`` replaces
    only a v4c artifact); partial directories that earlier, killed writers left there are removed."""

    def __init__(self, output: str | os.PathLike, log: Callable[[str], None] | None = None):
        self.output = Path(output)
        remove_stale(self.output, log or (lambda s: None))
        self.root = partial_dir(self.output)
        try:
            os.chmod(self.root, 0o777 & ~_umask())  # mkdtemp makes it 0700; the artifact gets the usual permissions
        except BaseException:
            discard_partial(self.root)
            raise
        self._fields: dict = {}
        self._done = False

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if not self._done:
            self.discard()
        return False

    def discard(self) -> None:
        """Remove everything written so far (nothing is put in place)."""
        discard_partial(self.root)
        self._done = True

    # ------------------------------------------------------------------------------------- files
    def _file(self, rel: str) -> Path:
        check_rel(rel, "path", self.root / MANIFEST)
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _write_text(self, rel: str, text: str) -> str:
        self._file(rel).write_text(text)
        return rel

    def set_config(self, config: dict) -> None:
        """The normalised model config."""
        self._fields["config"] = self._write_text(CONFIG, json.dumps(config, indent=1, sort_keys=True) + "\n")

    def set_graph(self, text: str) -> None:
        """The graph's IR text."""
        self._fields["graph"] = self._write_text(GRAPH, text)

    def set_mtp(self, text: str | None, note: str) -> None:
        """The MTP block's graph text (None: the artifact has none) and the compile's line on why."""
        self._fields["mtp"] = {"graph": self._write_text(MTP_GRAPH, text) if text is not None else None, "note": note}

    def set_parallel(self, plan: dict, graphs: list[str]) -> None:
        """A sharded artifact: ``plan`` (the sharding pass's description: ``world_size``, ``ep``, ``attn``,
        and per rank its ``param_bytes`` and ``shards``) and each rank's graph text, in rank order."""
        ranks = plan["ranks"]
        if len(graphs) != len(ranks) or plan["world_size"] != len(ranks):
            raise ValueError(f"a plan for {plan['world_size']} rank(s) lists {len(ranks)}, with {len(graphs)} "
                             f"graph(s)")
        laid = [{**entry, "rank": r, "graph": self._write_text(rank_graph(r), text)}
                for r, (entry, text) in enumerate(zip(ranks, graphs))]
        self._fields["parallel"] = {**{k: v for k, v in plan.items() if k != "ranks"}, "ranks": laid}

    def add_kernel_modules(self, modules: Iterable[tuple[str, str]]) -> None:
        """The rendered kernel modules, as (the relative file name the kernel table gives it, source)."""
        for rel, src in modules:
            self._write_text(rel, src)

    def set_kernels(self, table: dict, buckets: list[str], context: int) -> None:
        """The kernel table (modules, ops, call sites and their per-bucket configs), the shape buckets the
        configs were chosen for and the context they were compiled at."""
        self._fields["kernels"] = {**table, "buckets": list(buckets), "context": context}

    def add_aot_binary(self, key: str, files: Iterable[str | os.PathLike]) -> dict:
        return put_aot_binary(self.root, key, files)

    def set_aot(self, entry: dict) -> None:
        """The ahead-of-time compile's record; its binaries were put in with ``add_aot_binary``."""
        self._fields["aot"] = entry

    def add_tokenizer(self, src: Path) -> None:
        """The checkpoint's tokenizer (for ``v4c run --prompt``)."""
        shutil.copyfile(src, self._file(TOKENIZER))

    def copy_weights(self, files: list[Path], index: Path | None = None) -> None:
        """Weights mode "copy": the checkpoint's safetensors files (and its index) inside the artifact."""
        self._file(WEIGHTS).mkdir()
        names = []
        for f in files:
            shutil.copyfile(f, self._file(weight_file(f.name)))
            names.append(weight_file(f.name))
        if index is not None and index.is_file():
            shutil.copyfile(index, self._file(weight_file(index.name)))
        self._fields["weights"] = {"mode": "copy", "files": names}

    def reference_weights(self, location: Path, ckpt) -> None:
        """Weights mode "reference": the checkpoint stays at ``location``; exactly its files, in the layout
        ``ckpt`` has now, are loaded (each pinned by its size, header hash and content hash)."""
        self._fields["weights"] = {"mode": "reference", "location": str(Path(location).resolve()),
                                   "files": reference_entries(ckpt)}

    def no_weights(self) -> None:
        """A weight-free artifact: inspected, reported on, checked ahead of time; never run."""
        self._fields["weights"] = {"mode": "none"}

    def set_meta(self, *, target: str, dtype: str, toolchain: dict, passes: list, kv_cache: str | None,
                 indexer_cache: str | None) -> None:
        self._fields.update(target=target, dtype=dtype, toolchain=toolchain, passes=list(passes), kv_cache=kv_cache,
                            indexer_cache=indexer_cache)

    def commit(self) -> Path:
        """Hash every file, seal the manifest and put the artifact in place; returns ``output``."""
        hashes = {p.relative_to(self.root).as_posix(): sha256_file(p)
                  for p in sorted(self.root.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **self._fields, "files": hashes}
        check_schema(manifest, self.output / MANIFEST)  # never seal a manifest that would not load
        write_manifest(self.root, manifest)
        put_in_place(self.root, self.output)
        self._done = True
        return self.output


def update_kernels(art: Artifact, edit: Callable[[dict], None]) -> Artifact:
    """Change, in place, the kernel table of the artifact ``art`` was read from. Under the manifest's lock
    the manifest is read as it is now (so concurrent updates keep each other's changes), refused when the
    artifact's files differ from ``art``'s (it was recompiled meanwhile), ``edit`` changes its kernel table
    in place, and the result is checked, sealed with a new digest and written atomically."""
    def change(data: dict) -> None:
        if data["files"] != art.data["files"]:  # e.g. recompiled in place while it was being tuned
            raise ArtifactError(f"{art.root}: the artifact changed while it was being tuned; its manifest is left "
                                f"as it is (tune it again)")
        edit(data.setdefault("kernels", {}))
    return update_manifest(art.root, change)
