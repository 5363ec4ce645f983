"""Tuning records, the SQLite tuning store, graded lookup, bundles, merges and Redis sharing."""
import json
import multiprocessing
import shutil
import socket
import sqlite3
import subprocess
import time

import pytest

from v4c.autotune.records import (MAX_RECORD_BYTES, RecordError, TuningRecord,
                                  bucket_distance, source_hash_of)
from v4c.autotune.sharing import (BundleError, SharingWarning, export_bundle,
                                  import_bundle, merge_stores, pull, push, redis_hash_name)
from v4c.autotune.store import Lookup, StoreError, TuningStore, default_store_path

SRC = source_hash_of("def sparse_attention_kernel(): pass\n")
H200 = {"arch": "sm90", "sm_count": 132, "memory_bytes": 150_754_820_096, "product": "NVIDIA H200"}
H100 = {"arch": "sm90", "sm_count": 132, "memory_bytes": 85_520_809_984, "product": "NVIDIA H100 80GB HBM3"}
TC = {"triton": "3.6.0", "torch": "2.11.0+cu130", "cuda": "13.0"}


def rec(**over) -> TuningRecord:
    """A valid record; keyword overrides replace fields."""
    fields = dict(
        kernel="sparse_attention", source_hash=SRC, signature="kind=csa,kv_format=fp8_ds",
        bucket="T=1,L=131072", dtypes="bf16", quant="kv=fp8_ds,idx=mxfp4",
        hardware=dict(H200), toolchain=dict(TC),
        config={"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLIT_K": 8},   # on the template's grid
        best_seconds=1.5e-5,
        timings=[
            {"config": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLIT_K": 8},
             "seconds": 1.5e-5, "status": "ok", "detail": ""},
            {"config": {"BLOCK_N": 256, "num_warps": 8, "num_stages": 4, "SPLIT_K": 8},
             "seconds": None, "status": "out_of_resources", "detail": "shared memory 262144 > 232448"},
        ],
        method={"kind": "cuda_events", "reps": 50, "warmup": 10, "l2_flush": True, "cuda_graph": False},
        spread=0.03, measured_at="2026-05-01T12:00:00Z", host="node-07",
    )
    fields.update(over)
    return TuningRecord(**fields)


def hw(**over):
    return dict(H200, **over)


# ----------------------------------------------------------------------------- records

def test_record_round_trip():
    r = rec()
    d = json.loads(json.dumps(r.to_json()))
    back = TuningRecord.from_json(d)
    assert back == r and back.canonical() == r.canonical() and hash(back) == hash(r)
    assert TuningRecord.from_text(r.canonical()) == r
    assert r.key() == ("sparse_attention", SRC, "kind=csa,kv_format=fp8_ds", "T=1,L=131072",
                       "bf16", "kv=fp8_ds,idx=mxfp4", "sm90", 132, 150_754_820_096,
                       "3.6.0", "2.11.0+cu130", "13.0")
    # product is metadata only; an upper-case hash is normalised; ints become float seconds
    assert rec(hardware=hw(product="H200 NVL")).key() == r.key()
    assert rec(source_hash=SRC.upper()).source_hash == SRC
    assert rec(best_seconds=1).best_seconds == 1.0
    assert rec(toolchain={"triton": None, "torch": "2.11.0", "cuda": None}).key()[-3:] == (None, "2.11.0", None)
    assert TuningRecord.from_json(rec(method={"kind": "interpreter", "meaningless": True}).to_json()).method["meaningless"]


def _mut(path, value):
    """Mutator setting d[path...] = value (value DELETE removes the entry)."""
    def f(d):
        obj = d
        for p in path[:-1]:
            obj = obj[p]
        if value is DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return d
    return f


DELETE = object()
BAD = [
    (_mut(["kernel"], 7), r"^kernel: expected a string, got int"),
    (_mut(["kernel"], ""), r"^kernel: must not be empty"),
    (_mut(["source_hash"], "abc123"), r"^source_hash: not a sha256 hex digest"),
    (_mut(["source_hash"], "g" * 64), r"^source_hash: not a sha256 hex digest"),
    (_mut(["bucket"], None), r"^bucket: expected a string, got NoneType"),
    (_mut(["hardware", "sm_count"], "132"), r"^hardware\.sm_count: expected an integer"),
    (_mut(["hardware", "sm_count"], True), r"^hardware\.sm_count: expected an integer"),
    (_mut(["hardware", "memory_bytes"], -1), r"^hardware\.memory_bytes: must be >= 0"),
    (_mut(["hardware", "arch"], DELETE), r"^hardware\.arch: missing"),
    (_mut(["hardware", "arch"], "sm 90; rm -rf"), r"^hardware\.arch: not an architecture name"),
    (_mut(["hardware"], "H200"), r"^hardware: expected an object, got str"),
    (_mut(["toolchain", "triton"], 3.6), r"^toolchain\.triton: expected a string, got float"),
    (_mut(["toolchain", "cuda"], DELETE), r"^toolchain\.cuda: missing"),
    (_mut(["config", "BLOCK_N"], [64]), r"^config\.BLOCK_N: value must be int/float/str/bool/null, got list"),
    (_mut(["config", "BLOCK_N"], {"a": 1}), r"^config\.BLOCK_N: value must be int/float/str/bool/null, got dict"),
    (_mut(["best_seconds"], -1e-6), r"^best_seconds: negative time"),
    (_mut(["best_seconds"], "fast"), r"^best_seconds: expected a number of seconds, got str"),
    (_mut(["best_seconds"], None), r"^best_seconds: expected a number of seconds, got NoneType"),
    (_mut(["timings", 1, "status"], "exploded"), r"^timings\[1\]\.status: unknown status 'exploded'"),
    (_mut(["timings", 0, "seconds"], -0.5), r"^timings\[0\]\.seconds: negative time"),
    (_mut(["timings", 0, "seconds"], None), r"^timings\[0\]\.seconds: null for status 'ok'"),
    (_mut(["timings", 0, "config", "BLOCK_N"], [1]), r"^timings\[0\]\.config\.BLOCK_N: value must be"),
    (_mut(["timings", 0, "cost"], 1), r"^timings\[0\]\.cost: unknown field"),
    (_mut(["timings"], {"a": 1}), r"^timings: expected a list, got dict"),
    (_mut(["timings"], [{"config": {}, "seconds": None, "status": "timeout"}] * 10_001),
     r"^timings: 10001 entries, more than 10000 \(oversize\)"),
    (_mut(["host"], "x" * 5000), r"^host: string longer than 4096 bytes \(oversize\)"),
    (_mut(["timings", 1, "detail"], "é" * 2100), r"^timings\[1\]\.detail: string longer than 4096"),
    (_mut(["method"], {"reps": 50}), r"^method\.kind: missing"),
    (_mut(["method", "reps"], [50]), r"^method\.reps: value must be"),
    (_mut(["spread"], -0.1), r"^spread: expected a finite number >= 0"),
    (_mut(["measured_at"], "yesterday"), r"^measured_at: not an ISO-8601 timestamp"),
    (_mut(["measured_at"], "2026-05-01T12:00:00+02:00"), r"^measured_at: must be UTC"),
    (_mut(["measured_at"], "2026-05-01T12:00:00"), r"^measured_at: must be UTC"),
    (_mut(["schema"], 2), r"^schema: unsupported schema 2"),
    (_mut(["extra"], 1), r"^extra: unknown field"),
    (_mut(["method"], DELETE), r"^method: missing"),
    (_mut(["timings"], [{"config": {"s": "x" * 4000}, "seconds": 1.0, "status": "ok", "detail": "y" * 4000}] * 200),
     r"^record: \d+ bytes of JSON, over the 1048576-byte limit \(oversize\)"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_record_validation_names_the_field(mutate, message):
    d = mutate(rec().to_json())
    with pytest.raises(RecordError, match=message):
        TuningRecord.from_json(d)


def test_record_validation_of_text_and_constructor():
    with pytest.raises(RecordError, match=r"^record: expected a JSON object, got list"):
        TuningRecord.from_json([1])
    with pytest.raises(RecordError, match=r"NaN is not valid JSON"):
        TuningRecord.from_text(rec().canonical().replace("1.5e-05,", "NaN,", 1))
    with pytest.raises(RecordError, match=r"^record: not valid JSON"):
        TuningRecord.from_text("{")
    with pytest.raises(RecordError, match=r"oversize"):
        TuningRecord.from_text(b" " * (MAX_RECORD_BYTES + 1))
    with pytest.raises(RecordError, match=r"^best_seconds: must be finite"):
        rec(best_seconds=float("inf"))
    with pytest.raises(RecordError, match=r"^config\.x: must be finite"):
        rec(config={"x": float("nan")})


# ----------------------------------------------------------------------------- store

def test_store_default_path_wal_and_put_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("V4C_CACHE_DIR", str(tmp_path / "cache"))
    assert default_store_path() == tmp_path / "cache" / "tuning.sqlite"
    st = TuningStore()
    assert st.path == tmp_path / "cache" / "tuning.sqlite" and st.path.exists()
    assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 30_000

    a = rec()
    assert st.put(a).outcome == "added" and len(st) == 1 and a.key() in st and a in st
    assert st.put(a).outcome == "kept" and st.history(a.key()) == 1   # idempotent
    slower = rec(best_seconds=2e-5, config={"BLOCK_N": 32}, host="node-08")
    res = st.put(slower)
    assert res.outcome == "kept" and res.previous == a and st.get(a.key()) == a
    assert st.history(*a.key()) == 2
    faster = rec(best_seconds=1e-5, config={"BLOCK_N": 16}, host="node-09")
    assert st.put(faster).outcome == "updated" and st.get(*a.key()) == faster
    assert st.history(a.key()) == 3
    # a cost-model estimate never replaces a device measurement, however fast it claims
    est = rec(best_seconds=1e-6, method={"kind": "cost_model"}, timings=[], spread=0.0)
    assert st.put(est).outcome == "kept" and st.get(a.key()) == faster
    # all() is ordered by key, delete removes
    b = rec(bucket="T=64,L=131072")
    st.put(b)
    assert [r.key_json() for r in st.all()] == sorted(r.key_json() for r in st.all())
    assert st.delete(b.key()) and not st.delete(b.key()) and len(st) == 1
    assert st.integrity_check() == "ok"
    st.close()
    # the store re-opens with its content, and refuses a newer schema or a non-database
    assert TuningStore().get(a.key()) == faster
    con = sqlite3.connect(tmp_path / "cache" / "tuning.sqlite")
    con.execute("PRAGMA user_version=99")
    con.close()
    with pytest.raises(StoreError, match="schema 99 is newer"):
        TuningStore()
    (tmp_path / "junk.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="junk.sqlite"):
        TuningStore(tmp_path / "junk.sqlite")


def test_corrupt_row_is_a_miss_not_a_crash(tmp_path):
    st = TuningStore(tmp_path / "t.sqlite")
    a, b = rec(), rec(bucket="T=2,L=131072")
    st.put_many([a, b])
    st.conn.execute("UPDATE records SET payload=? WHERE key_json=?", ('{"kernel": 1}', a.key_json()))
    with pytest.warns(RuntimeWarning, match="skipping invalid tuning row"):
        assert st.get(a.key()) is None
    with pytest.warns(RuntimeWarning):
        assert st.all() == [b]


def _stress_writer(path, proc, start):
    """One of eight concurrent writers: 50 own records and 10 keys every writer shares."""
    start.wait(30)
    st = TuningStore(path)
    for i in range(50):
        st.put(rec(bucket=f"T={proc + 1},L={1024 * (i + 1)}", host=f"p{proc}"))
    for i in range(10):
        st.put(rec(bucket=f"T=4096,L={1024 * (i + 1)}", best_seconds=1.0 + 0.01 * proc,
                   config={"BLOCK_N": (16, 32, 64)[proc % 3]}, host=f"p{proc}"))
    st.close()


def test_eight_processes_write_one_store(tmp_path):
    path = tmp_path / "shared" / "tuning.sqlite"
    TuningStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_stress_writer, args=(str(path), p, start)) for p in range(8)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    st = TuningStore(path)
    assert len(st) == 8 * 50 + 10
    assert st.integrity_check() == "ok"
    for i in range(10):
        key = rec(bucket=f"T=4096,L={1024 * (i + 1)}").key()
        assert st.get(key).host == "p0" and st.get(key).best_seconds == 1.0
        assert st.history(key) == 8
    assert {r.host for r in st.all()} == {f"p{p}" for p in range(8)}


# ----------------------------------------------------------------------------- lookup

def _q(st, bucket="T=1,L=131072", hardware=H200, toolchain=TC, **over):
    args = dict(kernel="sparse_attention", source_hash=SRC, signature="kind=csa,kv_format=fp8_ds",
                bucket=bucket, dtypes="bf16", quant="kv=fp8_ds,idx=mxfp4",
                hardware=hardware, toolchain=toolchain)
    args.update(over)
    return st.lookup(**args)


def test_lookup_tiers(tmp_path):
    st = TuningStore(tmp_path / "t.sqlite")
    miss = _q(st)
    assert miss == Lookup(None, None, None) and not miss
    record, tier = miss
    assert record is None and tier is None

    exact = rec()
    st.put(exact)
    got = _q(st, hardware=dict(H200, product="NVIDIA H200 NVL"))   # product is not identity
    assert (got.record, got.tier, got.bucket, got.distance) == (exact, "exact", "T=1,L=131072", 0.0)
    # another memory size with the same arch and SM count
    assert _q(st, hardware=H100).tier == "same-arch"
    # same hardware, other toolchains: the newest not newer than ours, then the nearest newer
    st.delete(exact.key())
    for v in ("3.4.0", "3.5.1", "3.9.0"):
        st.put(rec(toolchain=dict(TC, triton=v), host=v))
    got = _q(st)
    assert got.tier == "older-toolchain" and got.record.toolchain["triton"] == "3.5.1"
    got = _q(st, toolchain=dict(TC, triton="3.3.0"))
    assert got.tier == "older-toolchain" and got.record.toolchain["triton"] == "3.4.0"
    # an exact match beats every fallback tier even when it sits in a farther bucket
    far = rec(bucket="T=1,L=4096")
    st.put(far)
    got = _q(st)
    assert got.tier == "exact" and got.bucket == "T=1,L=4096" and got.distance == 5.0

    # arch family: sm90a / another SM count reach sm90 records; sm80 does not; sm100 not sm120
    fam = TuningStore(tmp_path / "f.sqlite")
    fam.put(rec())
    assert _q(fam, hardware=hw(arch="sm90a")).tier == "arch-family"
    assert _q(fam, hardware=hw(sm_count=114)).tier == "arch-family"
    assert _q(fam, hardware=hw(arch="sm80", sm_count=108)).record is None
    fam.put(rec(hardware=hw(arch="sm80", sm_count=108), host="a100"))
    fam.put(rec(hardware=hw(arch="sm86", sm_count=84), host="a6000"))
    fam.put(rec(hardware=hw(arch="sm120", sm_count=170), host="5090"))
    got = _q(fam, hardware=hw(arch="sm89", sm_count=142))
    assert got.tier == "arch-family" and got.record.host == "a6000"   # nearest older minor
    assert _q(fam, hardware=hw(arch="sm100", sm_count=148)).record is None
    assert _q(fam, hardware=hw(arch="sm120", sm_count=188)).record.host == "5090"
    # the kernel identity always has to match
    assert _q(fam, source_hash="0" * 64).record is None
    assert _q(fam, quant="").record is None


def test_lookup_nearest_bucket(tmp_path):
    st = TuningStore(tmp_path / "t.sqlite")
    for b in ("T=1,L=4096", "T=1,L=131072", "T=64,L=131072", "L=65536"):
        st.put(rec(bucket=b))
    assert bucket_distance("T=2,L=100000", "T=1,L=131072") == pytest.approx(1 + 0.390, abs=1e-3)
    got = _q(st, bucket="T=2,L=100000")
    assert (got.tier, got.bucket) == ("exact", "T=1,L=131072")
    assert _q(st, bucket="T=32,L=131072").bucket == "T=64,L=131072"
    assert _q(st, bucket="T=1,L=8192").bucket == "T=1,L=4096"
    assert _q(st, bucket="T=1,L=131072").distance == 0
    assert _q(st, bucket="L=16384").bucket == "L=65536"        # same dimensions only
    assert _q(st, bucket="M=16").record is None                # nothing comparable
    # a tie (T=2 and T=8 are both one octave from T=4) goes to the smaller bucket
    ties = TuningStore(tmp_path / "ties.sqlite")
    ties.put_many([rec(bucket="T=8"), rec(bucket="T=2")])
    assert _q(ties, bucket="T=4").bucket == "T=2"


# ----------------------------------------------------------------------------- bundles

def _fill(st, n=12):
    recs = [rec(bucket=f"T={2 ** (i % 4)},L={4096 * (i + 1)}", best_seconds=1e-5 * (i + 1),
                hardware=H100 if i % 3 == 0 else H200) for i in range(n)]
    st.put_many(recs)
    return recs


def test_export_import_between_cache_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("V4C_CACHE_DIR", str(tmp_path / "a"))
    src = TuningStore()
    recs = _fill(src)
    bundle, again = tmp_path / "tuning.json", tmp_path / "again.json"
    assert export_bundle(src, bundle) == len(recs)
    export_bundle(src, again)
    assert bundle.read_bytes() == again.read_bytes()
    text = bundle.read_text()
    assert text.startswith('{\n "format": "v4c-tuning-bundle",\n "records": [') and text.endswith("}\n")
    doc = json.loads(text)
    assert doc["schema"] == 1 and [r["bucket"] for r in doc["records"]] == [r.bucket for r in src.all()]

    monkeypatch.setenv("V4C_CACHE_DIR", str(tmp_path / "b"))
    dst = TuningStore()
    assert dst.path == tmp_path / "b" / "tuning.sqlite" and len(dst) == 0
    rep = import_bundle(dst, bundle)
    assert (rep.added, rep.updated, rep.kept, rep.rejected, rep.conflicts) == (len(recs), 0, 0, [], [])
    assert dst.all() == src.all()
    export_bundle(dst, again)
    assert again.read_bytes() == bundle.read_bytes()
    rep = import_bundle(dst, bundle)                         # importing twice changes nothing
    assert (rep.added, rep.kept) == (0, len(recs)) and dst.history(recs[0].key()) == 1

    only_h100 = tmp_path / "h100.json"
    assert export_bundle(src, only_h100, filter=lambda r: r.hardware["memory_bytes"] == H100["memory_bytes"]) == 4


def test_bundle_with_bad_records_imports_the_rest(tmp_path):
    src = TuningStore(tmp_path / "src.sqlite")
    _fill(src, 6)
    recs = src.all()                                       # bundle order = key order
    path = tmp_path / "b.json"
    export_bundle(src, path)
    doc = json.loads(path.read_text())
    doc["records"][1]["timings"][0]["status"] = "exploded"
    doc["records"][2] = "not a record"
    big = doc["records"][3]
    big["timings"] = [dict(big["timings"][0], detail="z" * 4000)] * 300
    doc["records"][4]["best_seconds"] = -1
    path.write_text(json.dumps(doc))
    dst = TuningStore(tmp_path / "dst.sqlite")
    rep = import_bundle(dst, path)
    assert rep.added == 2 and rep.ok
    reasons = dict(rep.rejected)
    assert sorted(reasons) == [1, 2, 3, 4]
    assert reasons[1].startswith("timings[0].status: unknown status 'exploded'")
    assert reasons[2] == "record: expected a JSON object, got str"
    assert "oversize" in reasons[3] and "1048576" in reasons[3]
    assert reasons[4].startswith("best_seconds: negative time")
    assert {r.key() for r in dst.all()} == {recs[0].key(), recs[5].key()}


def test_bad_bundles_are_refused_whole(tmp_path, monkeypatch):
    import v4c.autotune.sharing as sharing
    st = TuningStore(tmp_path / "t.sqlite")
    p = tmp_path / "x.json"
    for content, message in [
        ('{"format": "vllm-moe-config", "schema": 1, "records": []}', r"format is 'vllm-moe-config'"),
        ('{"format": "v4c-tuning-bundle", "schema": 2, "records": []}', r"bundle schema '2' is not supported"),
        ('{"format": "v4c-tuning-bundle", "schema": 1, "records": {}}', r"'records' must be a list"),
        ('{"format": "v4c-tuning-bundle", "schema": 1, "records": [], "code": "import os"}',
         r"unknown bundle field 'code'"),
        ("[1, 2]", r"top level is list"),
        ("{not json", r"not valid JSON"),
    ]:
        p.write_text(content)
        with pytest.raises(BundleError, match=message):
            import_bundle(st, p)
    p.write_bytes(b"\x80\x81")
    with pytest.raises(BundleError, match="not a UTF-8"):
        import_bundle(st, p)
    with pytest.raises(BundleError, match="cannot read bundle"):
        import_bundle(st, tmp_path / "missing.json")
    _fill(st, 3)
    export_bundle(st, p)
    monkeypatch.setattr(sharing, "MAX_BUNDLE_BYTES", 1000)
    with pytest.raises(BundleError, match="over the 1000-byte limit; refused"):
        import_bundle(TuningStore(tmp_path / "u.sqlite"), p)


def test_merge_keeps_best_and_reports_conflicts(tmp_path):
    a, b, dst = (TuningStore(tmp_path / f"{n}.sqlite") for n in "abd")
    k1_a = rec(config={"BLOCK_N": 64}, best_seconds=1.00e-5, spread=0.05, host="a")
    k1_b = rec(config={"BLOCK_N": 16}, best_seconds=1.02e-5, spread=0.05, host="b")  # indistinct
    k2_a = rec(bucket="T=2,L=131072", config={"BLOCK_N": 64}, best_seconds=3e-5, spread=0.01, host="a")
    k2_b = rec(bucket="T=2,L=131072", config={"BLOCK_N": 32}, best_seconds=2e-5, spread=0.01, host="b")  # clearly better
    k3_b = rec(bucket="T=4,L=131072", host="b")
    a.put_many([k1_a, k2_a])
    b.put_many([k1_b, k2_b, k3_b])
    rep = merge_stores(dst, a, b)
    assert (rep.added, rep.updated, rep.kept, rep.rejected) == (3, 1, 1, [])
    assert dst.get(k1_a.key()) == k1_a and dst.get(k2_a.key()) == k2_b and dst.get(k3_b.key()) == k3_b
    assert dst.history(k1_a.key()) == 2
    assert len(rep.conflicts) == 1 and '{"BLOCK_N":64}' in rep.conflicts[0] \
        and '{"BLOCK_N":16}' in rep.conflicts[0] and "within their spreads" in rep.conflicts[0]
    # the result does not depend on the merge order
    other = TuningStore(tmp_path / "o.sqlite")
    merge_stores(other, b, a)
    assert other.all() == dst.all()


# ----------------------------------------------------------------------------- Redis

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server binary not found (Debian: apt-get install -y redis-server)")
    pytest.importorskip("redis", reason="python package 'redis' not installed (pip install redis)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_push_then_pull(tmp_path, redis_url):
    import redis
    src = TuningStore(tmp_path / "src.sqlite")
    recs = _fill(src, 8)
    rep = push(src, redis_url)
    assert rep.ok and (rep.pushed, rep.unchanged) == (8, 0)
    assert push(src, redis_url).unchanged == 8                  # nothing better to publish
    client = redis.Redis.from_url(redis_url)
    hname = redis_hash_name("v4c")
    assert client.hlen(hname) == 8
    field = recs[0].key_json()
    assert json.loads(client.hget(hname, field)) == recs[0].to_json()

    dst = TuningStore(tmp_path / "dst.sqlite")
    rep = pull(dst, redis_url)
    assert rep.ok and rep.added == 8 and rep.rejected == []
    assert dst.all() == src.all()

    # a poisoned value is rejected with its reason, the rest still arrives
    client.hset(hname, field, b'{"kernel": "x", "__reduce__": "os.system"}')
    client.hset(hname, "junk-field", rec(bucket="T=3").canonical())
    fresh = TuningStore(tmp_path / "fresh.sqlite")
    rep = pull(fresh, redis_url)
    assert rep.ok and rep.added == 7 and len(rep.rejected) == 2
    reasons = dict(rep.rejected)
    assert reasons[field].startswith("__reduce__: unknown field")
    assert "not its key" in reasons["junk-field"]
    # namespaces are separate hashes
    assert pull(TuningStore(tmp_path / "n.sqlite"), redis_url, namespace="other").added == 0
    # a better local record replaces the poisoned value on the next push
    assert push(src, redis_url).pushed == 1
    client.close()


def test_redis_unreachable_fails_open(tmp_path):
    pytest.importorskip("redis", reason="python package 'redis' not installed (pip install redis)")
    st = TuningStore(tmp_path / "t.sqlite")
    _fill(st, 2)
    url = f"redis://:secret@127.0.0.1:{_free_port()}/0"   # nothing listens there
    with pytest.warns(SharingWarning, match=r"Redis at redis://:\*\*\*@127\.0\.0\.1:\d+/0 unusable") as w:
        rep = push(st, url)
    assert not rep.ok and rep.pushed == 0 and "Connection" in rep.error
    assert all("secret" not in str(x.message) for x in w)
    with pytest.warns(SharingWarning, match="127.0.0.1"):
        rep = pull(st, url)
    assert not rep.ok and rep.added == 0 and len(st) == 2
