"""The prefix cache's disk tier (``v4c.runtime.context_store``): snapshots that survive a restart, files
named by the block hash chain, and files that must never be used (corrupted, truncated, another
artifact's), each ignored and counted."""
import os

import pytest
import torch

import v4c
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from v4c.runtime.prefix_cache import PrefixCache, tail_key


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcd")
    write_random_checkpoint(tiny_config_dict(), root / "ckpt", seed=0)
    write_random_checkpoint(tiny_config_dict(), root / "other", seed=1)  # the same shapes, other weights
    return {"f32": v4c.load(v4c.compile(root / "ckpt", root / "f32", target="cpu")),
            "fp8-fp4": v4c.load(v4c.compile(root / "ckpt", root / "q", target="cpu", kv_cache="fp8",
                                             indexer_cache="fp4")),
            "other": v4c.load(v4c.compile(root / "other", root / "o", target="cpu"))}


IDS = torch.randint(0, 1024, (1, 700), generator=torch.Generator().manual_seed(4))
TOKENS = IDS[0].tolist()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _fill(model, cache, ends=(256, 512, 600)):
    """One request through ``ends``, a snapshot at each; returns its session (row 0 at the last end)."""
    s = model.new_session(1, max_context=1024)
    for end in ends:
        s.forward(IDS[:, int(s.lengths[0]):end])
        cache.store(s, 0, TOKENS[:end])
    cache.flush()
    return s


def _files(d, kind):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(kind + "-"))


@pytest.mark.parametrize("fmt", ["f32", "fp8-fp4"])
def test_snapshots_survive_a_restart(models, tmp_path, fmt):
    model = models[fmt]
    first = PrefixCache.for_model(model, memory_bytes=0, disk_dir=tmp_path)  # disk only
    s = _fill(model, first)
    chain = first.chain(TOKENS[:600])
    assert _files(tmp_path, "b") == sorted(f"b-{h}.safetensors" for h in chain[1:3])  # each block once
    assert _files(tmp_path, "s") == sorted(f"s-{k}.safetensors" for k in (chain[1], chain[2],
                                                                           tail_key(chain[2], TOKENS[512:600])))
    first.close()
    again = PrefixCache.for_model(model, disk_dir=tmp_path)  # a new process: only the files remain
    assert {k: again.stats()["disk"][k] for k in ("entries", "blocks", "corrupt", "foreign")} == \
        {"entries": 3, "blocks": 2, "corrupt": 0, "foreign": 0}
    row = model.new_session(1, max_context=1024)
    hit = again.lookup(TOKENS)
    assert (hit.length, hit.tier) == (600, "disk")
    row.restore(0, hit.snapshot)
    again.release(hit)
    got = row.forward(IDS[:, 600:])
    assert torch.equal(got, s.forward(IDS[:, 600:]))  # the original row's continuation, bit for bit
    if fmt == "f32":
        assert rel(got, model.new_session(1, max_context=1024).forward(IDS)[:, 600:]) <= 1e-5
    assert again.lookup(TOKENS).tier == "memory"  # read back once, then held in memory
    st = again.stats()["disk"]
    assert (st["reads"], st["corrupt"]) == (1, 0)


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupted_and_truncated_files_are_ignored_counted_and_removed(models, tmp_path):
    model = models["f32"]
    cache = PrefixCache.for_model(model, memory_bytes=0, disk_dir=tmp_path)
    _fill(model, cache)
    chain = cache.chain(TOKENS[:600])
    _flip(tmp_path / f"b-{chain[2]}.safetensors", -5)  # a byte of the second block's rows
    s = model.new_session(1, max_context=1024)
    assert cache.resume(s, 0, TOKENS) == 256  # 600 and 512 need that block: the next longest is used
    assert rel(s.forward(IDS[:, 256:]), model.new_session(1, max_context=1024).forward(IDS)[:, 256:]) <= 1e-5
    st = cache.stats()["disk"]
    assert (st["corrupt"], st["entries"], st["blocks"]) == (1, 1, 1)
    assert _files(tmp_path, "b") == [f"b-{chain[1]}.safetensors"] and _files(tmp_path, "s") == [
        f"s-{chain[1]}.safetensors"]
    cache.close()
    snap = tmp_path / f"s-{chain[1]}.safetensors"
    snap.write_bytes(snap.read_bytes()[:-100])  # truncated: found when the directory is read
    again = PrefixCache.for_model(model, memory_bytes=0, disk_dir=tmp_path)
    assert again.stats()["disk"]["corrupt"] == 1 and again.resume(model.new_session(1), 0, TOKENS) == 0
    # a bit flipped in a snapshot's own tensors: its content hash says so when it is read
    s = _fill(model, again, ends=(256,))
    _flip(snap, -3)
    assert again.resume(model.new_session(1, max_context=1024), 0, TOKENS) == 0
    assert again.stats()["disk"]["corrupt"] == 2 and not snap.exists()


def test_a_directory_written_by_another_artifact(models, tmp_path):
    mine, theirs = models["f32"], models["other"]
    _fill(theirs, PrefixCache.for_model(theirs, disk_dir=tmp_path))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 5
    cache = PrefixCache.for_model(mine, disk_dir=tmp_path)
    st = cache.stats()["disk"]
    assert (st["foreign"], st["entries"]) == (5, 0)  # the same token ids, other weights: nothing to use
    assert cache.resume(mine.new_session(1, max_context=1024), 0, TOKENS) == 0
    _fill(mine, cache)
    assert set(written) < {p.name for p in tmp_path.iterdir()}  # theirs are left alone
    # a file of theirs renamed to one of my keys is refused by its metadata, not trusted by its name
    key = cache.chain(TOKENS)[1]
    ours = tmp_path / f"s-{key}.safetensors"
    ours.unlink()
    os.replace(tmp_path / written[-1], ours)
    again = PrefixCache.for_model(mine, disk_dir=tmp_path)
    assert again.stats()["disk"]["foreign"] == 5  # 4 left of theirs, and the renamed one
    assert again.resume(mine.new_session(1, max_context=1024), 0, TOKENS[:300]) == 0


def test_the_disk_budget_keeps_the_most_recently_used(models, tmp_path):
    model = models["f32"]
    sizes = PrefixCache.for_model(model, memory_bytes=0, disk_dir=tmp_path / "probe")
    _fill(model, sizes, ends=(256,))
    one = sizes.stats()["disk"]["bytes"]  # a block and a boundary's rings
    prompts = [torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(10 + i)).tolist()
               for i in range(3)]
    cache = PrefixCache.for_model(model, memory_bytes=0, disk_dir=tmp_path / "c", disk_bytes=2 * one)
    s = model.new_session(1, max_context=512)
    for p in prompts[:2]:
        s.reset()
        s.forward(torch.tensor([p[:256]]))
        cache.store(s, 0, p[:256])
    cache.flush()
    cache.close()
    again = PrefixCache.for_model(model, memory_bytes=0, disk_dir=tmp_path / "c", disk_bytes=2 * one)
    assert again.resume(model.new_session(1, max_context=512), 0, prompts[0]) == 256  # now the newer use
    s.reset()
    s.forward(torch.tensor([prompts[2][:256]]))
    again.store(s, 0, prompts[2][:256])
    again.flush()
    st = again.stats()["disk"]
    assert (st["entries"], st["evictions"], st["bytes"]) == (2, 1, 2 * one)
    assert len(_files(tmp_path / "c", "b")) == 2 and len(_files(tmp_path / "c", "s")) == 2
    found = [again.resume(model.new_session(1, max_context=512), 0, p) for p in prompts]
    assert found == [256, 0, 256]  # the second was the least recently used: its files are gone
