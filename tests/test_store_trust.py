"""What the tuning store lets in: strict strings, plausible timings, configs the kernel's template
accepts; corrupt or foreign databases are errors that name the file, never tracebacks, and a corrupt
cache never blocks a compile."""
import hashlib
import json
import math
import sqlite3
import types
import warnings

import pytest

from v4c.autotune import sharing
from v4c.autotune.records import MIN_SECONDS, RecordError, TuningRecord
from v4c.autotune.sharing import BundleError, export_bundle, import_bundle, merge_stores, pull
from v4c.autotune.store import (StoreError, StoreWarning, TuningStore, config_problem,
                                open_for_lookup)
from v4c.cli import main

SRC = "ab" * 32
H100 = {"arch": "sm90", "sm_count": 132, "memory_bytes": 85_520_809_984, "product": "NVIDIA H100"}
TC = {"triton": "3.6.0", "torch": "2.11.0", "cuda": "13.0"}
GOOD = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def rec(**over) -> TuningRecord:
    """A valid record of the gemm template's `linear` kernel; keyword overrides replace fields."""
    fields = dict(kernel="linear", source_hash=SRC, signature='{"groups":1}', bucket="T=1,L=131072",
                  dtypes="bf16", quant="kv=plain,idx=plain", hardware=dict(H100), toolchain=dict(TC),
                  config=dict(GOOD), best_seconds=2e-5,
                  timings=[{"config": dict(GOOD), "seconds": 2e-5, "status": "ok", "detail": ""}],
                  method={"kind": "cuda_events", "reps": 20}, spread=0.01,
                  measured_at="2026-05-01T12:00:00Z", host="node-1")
    fields.update(over)
    return TuningRecord(**fields)


def lookup(st, **over):
    args = dict(kernel="linear", source_hash=SRC, signature='{"groups":1}', bucket="T=1,L=131072",
                dtypes="bf16", quant="kv=plain,idx=plain", hardware=H100, toolchain=TC)
    args.update(over)
    return st.lookup(**args)


def write_bundle(path, raws):
    """A bundle file holding these record JSON objects as they are (written with escapes, as
    json.dumps does, so a lone surrogate travels as the text \\ud800)."""
    path.write_text(json.dumps({"format": "v4c-tuning-bundle", "schema": 1, "records": raws}))
    return path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- strings (item 5)

def test_lone_surrogate_is_named_and_skipped_on_import(tmp_path, capsys):
    raws = [rec(bucket=f"T={i + 1},L=131072").to_json() for i in range(3)]
    raws[1]["host"] = "\ud800"
    raws[2]["config"] = {"BLOCK_M\udfff": 64}
    path = write_bundle(tmp_path / "b.json", raws)
    assert "\\ud800" in path.read_text()
    st = TuningStore(tmp_path / "t.sqlite")
    rep = import_bundle(st, path)
    assert rep.ok and rep.added == 1 and len(st) == 1
    assert dict(rep.rejected) == {
        1: "host: not valid Unicode text (lone surrogate '\\ud800' at position 0)",
        2: "config key: not valid Unicode text (lone surrogate '\\udfff' at position 7)"}
    # the command line says the same, printably, and succeeds
    assert main(["cache", "--cache", str(tmp_path / "c.sqlite"), "import", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 added, 0 updated, 0 kept, 2 rejected" in out
    assert "rejected 1: host: not valid Unicode text (lone surrogate '\\ud800' at position 0)" in out


def test_lone_surrogate_is_rejected_however_the_record_is_made():
    with pytest.raises(RecordError, match=r"^hardware\.product: not valid Unicode text \(lone surrogate"):
        rec(hardware=dict(H100, product="H\ud800"))
    with pytest.raises(RecordError, match=r"^timings\[0\]\.detail: not valid Unicode text"):
        rec(timings=[{"config": {}, "seconds": 1e-5, "status": "ok", "detail": "x\udc00"}])
    bad = rec().to_json()
    bad["\ud800"] = 1   # unknown field names are escaped in the message, so it can be printed
    with pytest.raises(RecordError, match=r"^'\\ud800': unknown field$"):
        TuningRecord.from_json(bad)


class _FakeRedis:
    """Just what `pull` uses of a redis client: hscan_iter and close."""
    RedisError = type("RedisError", (Exception,), {})

    def __init__(self, fields):
        self.fields = fields

    def hscan_iter(self, name, count=None):
        yield from self.fields.items()

    def close(self):
        pass


def _serve(monkeypatch, fields):
    client = _FakeRedis(fields)
    monkeypatch.setattr(sharing, "_client", lambda url: (types.SimpleNamespace(RedisError=_FakeRedis.RedisError),
                                                         client))


def test_pull_skips_a_poisoned_record_and_keeps_the_rest(tmp_path, monkeypatch, capsys):
    good = [rec(bucket=f"T={i + 1},L=131072") for i in range(3)]
    poisoned = rec(bucket="T=64,L=131072").to_json()
    poisoned["host"] = "\ud800"
    fields = {r.key_json().encode(): r.canonical().encode() for r in good}
    bad_field = rec(bucket="T=64,L=131072").key_json()
    fields[bad_field.encode()] = json.dumps(poisoned).encode()   # ASCII JSON with a \ud800 escape
    fields["\x1b[31mred".encode()] = good[0].canonical().encode()  # a field that is not its key
    _serve(monkeypatch, fields)
    st = TuningStore(tmp_path / "t.sqlite")
    rep = pull(st, "redis://team:6379/0")
    assert rep.ok and rep.added == 3 and set(st.all()) == set(good)
    reasons = dict(rep.rejected)
    assert reasons[bad_field] == "host: not valid Unicode text (lone surrogate '\\ud800' at position 0)"
    assert "not its key" in reasons["\x1b[31mred"]
    # the command line prints received text with its control characters escaped
    assert main(["cache", "--cache", str(tmp_path / "c.sqlite"), "pull", "--redis", "redis://team:6379/0"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "rejected \\x1b[31mred: record: stored under a field" in out


# ----------------------------------------------------------------------------- configs (item 6)

def test_configs_are_checked_against_the_template():
    assert config_problem("linear", GOOD) is None
    assert config_problem("linear", {}) is None                       # all defaults
    assert config_problem("linear", {"GROUP_M": 0}) == "GROUP_M=0 is not on linear's grid (1, 8)"
    assert config_problem("linear", {"GROUP_M": True}) == "GROUP_M=True is not on linear's grid (1, 8)"
    assert config_problem("linear", {"GROUP_M": 8.0}) == "GROUP_M=8.0 is not on linear's grid (1, 8)"
    assert config_problem("linear", {"split_kv": 1}).startswith("'split_kv' is not a meta-parameter of linear")
    assert config_problem("no_such_op", {}) == "'no_such_op' is not a kernel of this v4c (no template tunes it)"
    # on the grid, but the template's constraints refuse it at any size
    assert config_problem("linear", {"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 4}) == (
        "linear cannot run it: a 128x256 fp32 accumulator is 256 registers per thread with 4 warps (> 128)")
    # shape-dependent constraints are judged when the shapes are known
    big = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    assert config_problem("linear", big) is None
    assert "216 KiB of shared memory" in config_problem("linear", big, {"dtype": "f32"})
    # a router config tuned on a small model is not refused for the 256 experts the template assumes
    small = {"BLOCK_M": 32, "BLOCK_K": 128, "SORT_BLOCK": 32, "num_warps": 4, "num_stages": 2}
    assert config_problem("moe_router", small) is None


def test_a_bad_config_is_never_stored(tmp_path):
    st = TuningStore(tmp_path / "t.sqlite")
    with pytest.raises(RecordError, match=r"^config: GROUP_M=0 is not on linear's grid \(1, 8\)$"):
        st.put(rec(config=dict(GOOD, GROUP_M=0)))
    with pytest.raises(RecordError, match=r"^config: 'nope' is not a kernel of this v4c"):
        st.put_many([rec(bucket="T=2,L=131072"), rec(kernel="nope")])
    assert len(st) == 0   # all or nothing
    raws = [rec().to_json(), rec(bucket="T=2,L=131072").to_json()]
    raws[1]["config"]["GROUP_M"] = 0
    rep = import_bundle(st, write_bundle(tmp_path / "b.json", raws))
    assert rep.added == 1 and rep.rejected == [(1, "config: GROUP_M=0 is not on linear's grid (1, 8)")]


def _smuggle(st, r, **payload):
    """Write `r` with payload fields replaced straight into SQLite, as an older v4c or a hand edit
    could have left it."""
    d = dict(r.to_json(), **payload)
    st.conn.execute(
        "INSERT INTO records (key_json, kernel, source_hash, signature, dtypes, quant, bucket, arch, payload,"
        " history, seen, updated_at) VALUES (?,?,?,?,?,?,?,?,?,1,'[]',0)",
        (r.key_json(), r.kernel, r.source_hash, r.signature, r.dtypes, r.quant, r.bucket, r.hardware["arch"],
         json.dumps(d, sort_keys=True, separators=(",", ":"))))


def test_lookup_never_chooses_a_config_the_template_refuses(tmp_path):
    st = TuningStore(tmp_path / "t.sqlite")
    older = rec(toolchain=dict(TC, triton="3.5.0"))
    st.put(older)
    _smuggle(st, rec(), config=dict(GOOD, GROUP_M=0))                  # an "exact" match, unusable
    with pytest.warns(RuntimeWarning, match="skipping invalid tuning row.*config: GROUP_M=0 is not on linear's grid"):
        got = lookup(st)
    assert (got.record, got.tier) == (older, "older-toolchain")
    # at known shapes, a record the template refuses there is not chosen either
    big = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    st2 = TuningStore(tmp_path / "u.sqlite")
    st2.put(rec(config=big))
    assert lookup(st2).record.config == big
    assert lookup(st2, shapes={"dtype": "bf16"}).record.config == big
    assert lookup(st2, shapes={"dtype": "f32"}).record is None


# ----------------------------------------------------------------------------- timings (item 6)

@pytest.mark.parametrize("seconds,message", [
    (0, r"^best_seconds: implausible time 0 s, below the 1e-06 s floor"),
    (1e-9, r"^best_seconds: implausible time 1e-09 s, below the 1e-06 s floor"),
    (-1e-5, r"^best_seconds: negative time"),
    (math.nan, r"^best_seconds: must be finite, got nan"),
    (math.inf, r"^best_seconds: must be finite, got inf"),
    (10 ** 400, r"^best_seconds: must be finite"),
], ids=["zero", "1ns", "negative", "nan", "inf", "huge-int"])
def test_implausible_best_seconds_are_refused(seconds, message):
    with pytest.raises(RecordError, match=message):
        rec(best_seconds=seconds)


def test_timings_floor_applies_to_successful_candidates_only():
    assert rec(best_seconds=MIN_SECONDS).best_seconds == 1e-6
    with pytest.raises(RecordError, match=r"^timings\[0\]\.seconds: implausible time 0 s"):
        rec(timings=[{"config": {}, "seconds": 0, "status": "ok", "detail": ""}])
    failed = {"config": {}, "seconds": 0.0, "status": "compile_error", "detail": "ptxas"}
    assert rec(timings=[failed]).timings[0]["seconds"] == 0.0


def test_a_zero_second_record_cannot_win_a_merge_or_import(tmp_path):
    honest = rec()
    a, dst = TuningStore(tmp_path / "a.sqlite"), TuningStore(tmp_path / "d.sqlite")
    _smuggle(a, rec(host="liar"), best_seconds=0.0, config=dict(GOOD, BLOCK_M=16))
    dst.put(honest)
    rep = merge_stores(dst, a)
    assert rep.kept == 0 and rep.updated == 0 and dst.get(honest.key()) == honest
    assert len(rep.rejected) == 1 and "best_seconds: implausible time 0 s" in rep.rejected[0][1]
    raw = dict(honest.to_json(), best_seconds=0, host="liar")
    rep = import_bundle(dst, write_bundle(tmp_path / "b.json", [raw]))
    assert rep.updated == 0 and dst.get(honest.key()) == honest
    assert rep.rejected[0][1].startswith("best_seconds: implausible time 0 s, below the 1e-06 s floor")


# ----------------------------------------------------------------------------- databases (item 10)

def _corrupt_pages(path):
    """Keep SQLite's first page (so the file still opens), overwrite the rest."""
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)
    path.write_bytes(bytes(data))


def test_compile_with_a_corrupt_store_warns_once_and_uses_the_cost_model(tmp_path):
    import v4c
    from v4c.model.presets import tiny_config_dict
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config_dict()))
    junk = tmp_path / "tuning.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        art = v4c.compile(model, tmp_path / "art", target="cpu", tuning_cache=junk)
    ours = [x for x in w if issubclass(x.category, StoreWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert msg.startswith("compiling without tuning records (cost model and defaults): ")
    assert f"{junk}: not a usable tuning database" in msg and f"to fix it, delete {junk}" in msg
    sites = json.loads((art / "manifest.json").read_text())["kernels"]["sites"]
    assert {c["config_source"] for s in sites.values() for c in (s.get("configs") or {}).values()} == {"default"}
    assert junk.read_bytes() == b"this is not sqlite" * 100


def test_a_store_corrupted_after_opening_is_a_miss_for_lookups_and_an_error_elsewhere(tmp_path):
    path = tmp_path / "t.sqlite"
    st = TuningStore(path)
    st.put_many([rec(bucket=f"T={i + 1},L=131072", host="h" * 2000) for i in range(40)])
    st.close()
    _corrupt_pages(path)
    st = open_for_lookup(path)
    assert st is not None
    with pytest.warns(StoreWarning, match=r"tuning database unusable \(database disk image is malformed\)") as w:
        assert lookup(st).record is None and lookup(st).record is None
    assert len([x for x in w if issubclass(x.category, StoreWarning)]) == 1   # once per store
    with pytest.raises(StoreError, match=rf"^{path}: tuning database unusable .*to fix it, delete {path}"):
        st.get(rec().key())


def test_merge_from_a_missing_path_is_an_error_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "tuning.sqlite"
    dst = tmp_path / "dst.sqlite"
    assert main(["cache", "--cache", str(dst), "merge", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"v4c cache: error: {missing}: no such tuning store\n"
    assert not missing.exists() and not missing.parent.exists()


def test_merge_never_touches_a_foreign_or_corrupt_source(tmp_path, capsys):
    foreign = tmp_path / "app.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('ada')")
    con.commit()
    con.close()
    before = sha(foreign)
    dst = tmp_path / "dst.sqlite"
    assert main(["cache", "--cache", str(dst), "merge", str(foreign)]) == 2
    assert capsys.readouterr().err == (f"v4c cache: error: {foreign}: an SQLite database but not a v4c tuning "
                                       f"store (schema version 0, tables: users)\n")
    assert sha(foreign) == before and [p.name for p in tmp_path.glob("app.sqlite*")] == ["app.sqlite"]
    con = sqlite3.connect(foreign)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    # a foreign database is not taken over as the local store either
    assert main(["cache", "--cache", str(foreign), "export", "-o", str(tmp_path / "x.json")]) == 2
    assert "not a v4c tuning store" in capsys.readouterr().err and sha(foreign) == before

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00garbage" * 1000)
    assert main(["cache", "--cache", str(dst), "merge", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"v4c cache: error: {junk}: not a v4c tuning store (file is not a database)")
    assert "Traceback" not in err

    broken = tmp_path / "broken.sqlite"
    st = TuningStore(broken)
    st.put_many([rec(bucket=f"T={i + 1},L=131072", host="h" * 2000) for i in range(40)])
    st.close()
    _corrupt_pages(broken)
    before = sha(broken)
    assert main(["cache", "--cache", str(dst), "merge", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"v4c cache: error: {broken}: tuning database unusable (database disk image is malformed)")
    assert sha(broken) == before and len(TuningStore(dst)) == 0


def test_merge_reads_a_source_without_writing_to_it(tmp_path, capsys):
    src = tmp_path / "src" / "tuning.sqlite"
    st = TuningStore(src)
    st.put_many([rec(), rec(bucket="T=2,L=131072")])
    st.close()
    before = sha(src)
    dst = tmp_path / "dst.sqlite"
    assert main(["cache", "--cache", str(dst), "merge", str(src)]) == 0
    assert "2 added, 0 updated, 0 kept, 0 rejected" in capsys.readouterr().out
    assert sha(src) == before and [p.name for p in src.parent.iterdir()] == ["tuning.sqlite"]
    assert len(TuningStore(dst)) == 2


# ----------------------------------------------------------------------------- sizes (item 10)

def test_a_bundle_of_millions_of_trivial_entries_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "flood.json"
    path.write_text('{"format": "v4c-tuning-bundle", "schema": 1, "records": [' + ",".join(["0"] * 4_100_000) + "]}")
    parsed = []
    monkeypatch.setattr(sharing, "loads_strict", lambda *a: parsed.append(1))
    with pytest.raises(BundleError, match=r"up to 4100004 JSON values, over the 4000000 a bundle may hold; refused"):
        import_bundle(TuningStore(tmp_path / "t.sqlite"), path)
    assert parsed == []


def test_record_count_limits_apply_to_bundles_merges_and_pulls(tmp_path, monkeypatch):
    st = TuningStore(tmp_path / "t.sqlite")
    st.put_many([rec(bucket=f"T={i + 1},L=131072") for i in range(3)])
    monkeypatch.setattr(sharing, "MAX_BUNDLE_RECORDS", 2)
    with pytest.raises(BundleError, match=r"3 records, over the 2 a bundle may hold; export fewer"):
        export_bundle(st, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    write_bundle(tmp_path / "y.json", [r.to_json() for r in st.all()])
    with pytest.raises(BundleError, match=r"3 records, over the 2 a bundle may hold; refused"):
        import_bundle(TuningStore(tmp_path / "u.sqlite"), tmp_path / "y.json")
    st.close()
    with pytest.raises(StoreError, match=r"3 records, more than the 2 a merge reads from one source; refused"):
        merge_stores(TuningStore(tmp_path / "v.sqlite"), tmp_path / "t.sqlite")
    _serve(monkeypatch, {f"k{i}".encode(): b"{}" for i in range(3)})
    with pytest.warns(sharing.SharingWarning, match="or 2 records; refused"):
        rep = pull(w := TuningStore(tmp_path / "w.sqlite"), "redis://team:6379/0")
    assert not rep.ok and rep.imported == 0 and len(w) == 0


def test_the_cli_says_a_store_warning_once_as_one_line(tmp_path, monkeypatch, capsys):
    from v4c.cli import main
    from v4c.model.presets import tiny_config_dict
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(tiny_config_dict()))
    monkeypatch.setenv("V4C_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tuning.sqlite").write_bytes(b"this is not sqlite" * 100)
    assert main(["compile", str(tmp_path / "model"), "-o", str(tmp_path / "art"), "--target", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [ln for ln in err if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith("v4c compile: warning: compiling without tuning records")
    assert not any("warnings.warn" in ln or "Warning:" in ln for ln in err)
