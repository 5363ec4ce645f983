"""Safetensors reading/writing and multi-file checkpoints, including every way a file can be broken."""
import json
import re
import struct
import warnings

import pytest
import torch

from v4c.errors import CheckpointError, WeightMismatchError
from v4c.io.checkpoint import Checkpoint, ExpectedTensor, check_tensors
from v4c.io.safetensors import SafetensorsFile, TensorInfo, sha256_file, write_safetensors


def raw_file(path, header, data=b"", length=None):
    """Hand-craft a safetensors file: 8-byte length, JSON header (dict or raw bytes), data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def all_dtypes():
    g = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f32": torch.randn(4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "i32": torch.arange(6, dtype=torch.int32).view(2, 3),
        "i16": torch.tensor([-3, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "e4m3": torch.randn(3, 4, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
    }


def bytes_of(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


CODES = {"f64": "F64", "f32": "F32", "f16": "F16", "bf16": "BF16", "i64": "I64", "i32": "I32", "i16": "I16",
         "i8": "I8", "u8": "U8", "bool": "BOOL", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2", "scalar": "F32",
         "empty": "F32", "empty_bf16": "BF16"}


# --- round trips -------------------------------------------------------------------------------

def test_round_trip_every_dtype(tmp_path):
    src = all_dtypes()
    p = tmp_path / "model.safetensors"
    write_safetensors(p, src, metadata={"format": "pt", "note": "hi"})
    assert [q.name for q in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
    with SafetensorsFile(p) as f:
        assert f.names() == sorted(src)
        assert f.metadata == {"format": "pt", "note": "hi"}
        for name, t in src.items():
            info = f.info(name)
            assert isinstance(info, TensorInfo)
            assert (info.dtype, info.shape, info.nbytes) == (CODES[name], tuple(t.shape), t.numel() * t.element_size())
            got = f.tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert bytes_of(got) == bytes_of(t)  # bitwise, so fp8 and NaN-free compares need no casts


def test_e8m0_and_non_contiguous(tmp_path):
    p = tmp_path / "x.safetensors"
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    src = {"t": base.t(), "view": base[1]}  # non-contiguous, and a view sharing storage with "t"
    if hasattr(torch, "float8_e8m0fnu"):
        src["scale"] = torch.tensor([0.5, 1.0, 4.0]).to(torch.float8_e8m0fnu)
    write_safetensors(p, src)
    with SafetensorsFile(p) as f:
        assert torch.equal(f.tensor("t"), base.t())
        assert torch.equal(f.tensor("view"), base[1])
        if "scale" in src:
            assert f.info("scale").dtype == "F8_E8M0"
            assert f.tensor("scale").float().tolist() == [0.5, 1.0, 4.0]


def test_tensors_are_zero_copy_views_of_a_private_mapping(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"w": torch.arange(16, dtype=torch.float32).view(4, 4), "b": torch.ones(3)})
    digest = sha256_file(p)
    f = SafetensorsFile(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only buffer would make torch warn
        a, b = f.tensor("w"), f.tensor("w")
    assert a.data_ptr() == b.data_ptr()
    a[0, 0] = 100.0
    assert b[0, 0].item() == 100.0  # same bytes
    assert sha256_file(p) == digest  # copy-on-write: the file is untouched
    f.close()
    assert a[1, 1].item() == 5.0  # tensors handed out keep the mapping alive after close()
    with SafetensorsFile(p) as g:  # a fresh mapping sees the file, not the private write
        assert g.tensor("w")[0, 0].item() == 0.0


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib
    p = tmp_path / "blob"
    data = bytes(range(256)) * 1000
    p.write_bytes(data)
    assert sha256_file(p, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_write_replaces_atomically(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a": torch.ones(2)})
    write_safetensors(p, {"b": torch.zeros(3)})
    with SafetensorsFile(p) as f:
        assert f.names() == ["b"]
    with pytest.raises(Exception):
        write_safetensors(p, {"c": torch.ones(1)}, metadata={"bad": 1})  # metadata values must be str
    with SafetensorsFile(p) as f:
        assert f.names() == ["b"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m.safetensors"]


def test_unknown_name_is_a_key_error(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a": torch.ones(2)})
    with SafetensorsFile(p) as f, pytest.raises(KeyError, match="'nope'"):
        f.info("nope")


# --- corrupt files -----------------------------------------------------------------------------

def test_truncated_file(tmp_path):
    p = tmp_path / "model.safetensors"
    write_safetensors(p, {"w": torch.zeros(256, 1024)})
    data = p.read_bytes()
    p.write_bytes(data[:len(data) - 524288])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: header says 1048576 data bytes, "
                                              r"file has 524288"):
        SafetensorsFile(p)


def test_garbage_bytes(tmp_path):
    p = tmp_path / "g.safetensors"
    p.write_bytes(b"\xde\xad\xbe\xef" * 64)
    with pytest.raises(CheckpointError, match=r"g\.safetensors: header length \d+ is larger than the file \(256"):
        SafetensorsFile(p)


def test_tiny_file(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"t\.safetensors: too small.*\(2 bytes\)"):
        SafetensorsFile(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors: cannot read"):
        SafetensorsFile(tmp_path / "nothere.safetensors")


def test_header_length_larger_than_file(tmp_path):
    p = raw_file(tmp_path / "h.safetensors", {}, length=10_000)
    with pytest.raises(CheckpointError, match=r"h\.safetensors: header length 10000 is larger than the file"):
        SafetensorsFile(p)


@pytest.mark.parametrize("header, problem", [
    (b"\xff\xfe{}", r"not valid UTF-8"),
    (b'{"a": {"dtype": "F32",', r"not valid JSON"),
    (b'[1, 2]', r"JSON list, not an object"),
    (b'{"a": 1}', r"tensor 'a': entry is not an object"),
    (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', r"duplicate key 'a'"),
    (b'{"__metadata__": {"k": 3}}', r"__metadata__ must map strings to strings"),
])
def test_bad_header(tmp_path, header, problem):
    p = raw_file(tmp_path / "b.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"b\.safetensors: .*" + problem):
        SafetensorsFile(p)


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}, r"tensor 'w': unknown dtype 'F99'"),
    ({"shape": [1], "data_offsets": [0, 4]}, r"tensor 'w': unknown dtype None"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, r"tensor 'w': shape \[-1\] is not a list"),
    ({"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}, r"tensor 'w': shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, r"tensor 'w': data_offsets \[4, 0\] is not a valid"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, r"tensor 'w': data_offsets"),
    ({"dtype": "F32", "shape": [1]}, r"tensor 'w': data_offsets None"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
     r"tensor 'w': data_offsets \[0, 8\] span 8 bytes, but shape \(3,\) of F32 needs 12"),
    ({"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}, r"shape \(2, 2\) of BF16 needs 8"),
    ({"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 8]}, r"shape \(4,\) of F8_E4M3 needs 4"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}, r"truncated: header says 32 data bytes, file has 16"),
])
def test_bad_entry(tmp_path, entry, problem):
    p = raw_file(tmp_path / "e.safetensors", {"w": entry}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"e\.safetensors: .*" + problem):
        SafetensorsFile(p)


def test_overlapping_tensors(tmp_path):
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    p = raw_file(tmp_path / "o.safetensors", hdr, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"o\.safetensors: tensors 'a' and 'b' overlap"):
        SafetensorsFile(p)


def test_hand_made_file_with_misaligned_and_empty_tensors(tmp_path):
    # a 1-byte tensor first puts the F32 at an odd offset; reading must still be right
    hdr = {"__metadata__": {"m": "v"},
           "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
           "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
           "z": {"dtype": "I64", "shape": [0, 3], "data_offsets": [9, 9]}}
    data = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    p = raw_file(tmp_path / "m.safetensors", json.dumps(hdr).encode() + b"   ", data)
    with SafetensorsFile(p) as f:
        assert f.metadata == {"m": "v"}
        assert f.tensor("byte").tolist() == [7]
        assert f.tensor("f").tolist() == [1.5, -2.0]
        z = f.tensor("z")
        assert z.shape == (0, 3) and z.dtype == torch.int64


# --- checkpoints -------------------------------------------------------------------------------

def write_sharded(root, shards: dict[str, dict[str, torch.Tensor]], weight_map=None):
    root.mkdir(parents=True, exist_ok=True)
    for fname, tensors in shards.items():
        write_safetensors(root / fname, tensors)
    if weight_map is None:
        weight_map = {n: fname for fname, ts in shards.items() for n in ts}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def test_sharded_checkpoint_with_index(tmp_path):
    root = write_sharded(tmp_path / "ck", {
        "model-00001-of-00002.safetensors": {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.int64)},
        "model-00002-of-00002.safetensors": {"c": torch.full((2, 2), 3.0).bfloat16()},
    })
    write_safetensors(root / "stray.safetensors", {"zzz": torch.ones(1)})  # not in the index: ignored
    with Checkpoint.open(root) as ck:
        assert ck.names() == ["a", "b", "c"] and len(ck) == 3
        assert "a" in ck and "zzz" not in ck
        assert [f.name for f in ck.files()] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert ck.info("c").dtype == "BF16"
        assert ck.tensor("c").float().sum().item() == 12.0
        with pytest.raises(KeyError, match="'nope'"):
            ck.tensor("nope")


def test_single_file_and_model_safetensors(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": torch.ones(2)})
    write_safetensors(tmp_path / "other.safetensors", {"a": torch.ones(2)})  # ignored: model.safetensors wins
    with Checkpoint.open(tmp_path) as ck:
        assert ck.names() == ["a"] and [f.name for f in ck.files()] == ["model.safetensors"]
    with Checkpoint.open(tmp_path / "other.safetensors") as ck:
        assert ck.names() == ["a"] and [f.name for f in ck.files()] == ["other.safetensors"]


def test_unindexed_files(tmp_path):
    write_safetensors(tmp_path / "b.safetensors", {"y": torch.ones(1)})
    write_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(1)})
    with Checkpoint.open(tmp_path) as ck:
        assert ck.names() == ["x", "y"]
        assert [f.name for f in ck.files()] == ["a.safetensors", "b.safetensors"]


def test_duplicate_tensor_across_unindexed_files(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(1)})
    write_safetensors(tmp_path / "b.safetensors", {"x": torch.ones(1), "y": torch.ones(1)})
    with pytest.raises(CheckpointError, match=r"tensor 'x' is in both a\.safetensors and b\.safetensors"):
        Checkpoint.open(tmp_path)


def test_missing_shard(tmp_path):
    root = write_sharded(tmp_path, {"s1.safetensors": {"a": torch.ones(1)}},
                         weight_map={"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"})
    with pytest.raises(CheckpointError, match=r"shard s2\.safetensors is missing \(the index maps 2 tensors to it\)"):
        Checkpoint.open(root)


def test_tensor_missing_from_its_shard(tmp_path):
    root = write_sharded(tmp_path, {"s1.safetensors": {"a": torch.ones(1)}, "s2.safetensors": {"b": torch.ones(1)}},
                         weight_map={"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(CheckpointError, match=r"maps tensor 'b' to shard s1\.safetensors, which does not contain it"):
        Checkpoint.open(root)


def test_bad_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json: cannot read the index"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"leaves the checkpoint directory"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"no weight_map"):
        Checkpoint.open(tmp_path)


def test_corrupt_shard_is_named(tmp_path):
    root = write_sharded(tmp_path, {"s1.safetensors": {"a": torch.ones(4)}})
    (root / "s1.safetensors").write_bytes((root / "s1.safetensors").read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"s1\.safetensors: truncated"):
        Checkpoint.open(root)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: no safetensors files")):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match=r"no such file or directory"):
        Checkpoint.open(tmp_path / "absent")


# --- check_tensors -----------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {
        "model.embed.weight": torch.zeros(10, 4),
        "model.layers.1.self_attn.q_a_proj.weight": torch.zeros(128, 255),
        "model.norm.weight": torch.zeros(4, dtype=torch.int32),
        "model.tid2eid": torch.zeros(10, 2, dtype=torch.int64),
        "model.scale": torch.zeros(4, dtype=torch.float16),
        "extra.weight": torch.zeros(1),
        "mtp.0.weight": torch.zeros(1),
    })
    with Checkpoint.open(tmp_path) as ck:
        yield ck


def test_check_tensors_passes(ckpt):
    ok = {"model.embed.weight": ExpectedTensor((10, 4), "float"),
          "model.layers.1.self_attn.q_a_proj.weight": ExpectedTensor((128, 255), "F32"),
          "model.norm.weight": ExpectedTensor((4,), "int"),
          "model.tid2eid": ExpectedTensor((10, 2), "I64"),
          "model.scale": ExpectedTensor((4,), "float")}
    check_tensors(ckpt, ok, ignore_prefixes=("mtp.", "extra."))


def test_check_tensors_lists_every_problem(ckpt):
    expected = {"model.embed.weight": ExpectedTensor((10, 4), "float"),
                "model.layers.1.self_attn.q_a_proj.weight": ExpectedTensor((128, 256), "float"),
                "model.norm.weight": ExpectedTensor((4,), "float"),
                "model.tid2eid": ExpectedTensor((10, 2), "int"),
                "model.scale": ExpectedTensor((4,), "BF16"),
                "model.lm_head.weight": ExpectedTensor((10, 4), "float")}
    with pytest.raises(WeightMismatchError) as ei:
        check_tensors(ckpt, expected)
    e = ei.value
    msg = str(e)
    assert "1 missing, 1 unexpected, 3 mismatched" in msg
    assert e.missing == ["model.lm_head.weight"]
    assert e.unexpected == ["extra.weight"]  # mtp.* is ignored by default
    assert e.mismatched == ["model.layers.1.self_attn.q_a_proj.weight", "model.norm.weight", "model.scale"]
    assert "model.layers.1.self_attn.q_a_proj.weight: expected shape (128, 256) float, found (128, 255) F32" in msg
    assert "model.norm.weight: expected shape (4,) float, found (4,) I32" in msg
    assert "model.scale: expected shape (4,) BF16, found (4,) F16" in msg
    assert re.search(r"missing \(1\):\n\s+model\.lm_head\.weight", msg)
    assert re.search(r"unexpected \(1\):\n\s+extra\.weight", msg)


def test_check_tensors_ignore_prefixes(ckpt):
    expected = {n: ExpectedTensor(ckpt.info(n).shape, ckpt.info(n).dtype) for n in ckpt.names()
                if not n.startswith(("mtp.", "extra."))}
    check_tensors(ckpt, expected, ignore_prefixes=("mtp.", "extra."))
    with pytest.raises(WeightMismatchError, match=r"unexpected \(2\):\n\s+extra\.weight\n\s+mtp\.0\.weight"):
        check_tensors(ckpt, expected, ignore_prefixes=())


def test_check_tensors_truncates_long_lists(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": torch.zeros(1)})
    expected = {f"w{i:02d}": ExpectedTensor((1,), "float") for i in range(25)}
    expected["a"] = ExpectedTensor((1,), "float")
    with Checkpoint.open(tmp_path) as ck, pytest.raises(WeightMismatchError, match=r"w19\n\s+\.\.\. and 5 more") as ei:
        check_tensors(ck, expected)
    assert len(ei.value.missing) == 25 and "w20" not in str(ei.value)


def test_expected_tensor_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'half'"):
        ExpectedTensor((1,), "half")
