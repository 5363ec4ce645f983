"""Autotuning without a GPU: device table, candidate pruning, cost model, shape buckets, search.

The template module here is a fake written against the contract in
``v4c/codegen/templates/__init__.py`` (KERNELS, META, DEFAULT_META, constraints), so these
tests do not depend on what the real template families contain.  The headline check runs
TPE on timing tables recorded from the cost model and prints the regret it reaches.
"""
import dataclasses
import itertools
import math
import statistics
import sys
import types
import warnings

import pytest

from v4c.autotune import buckets, costmodel, devices, search, space
from v4c.autotune.devices import DEVICES, DEVICES_BY_PRODUCT, device_for_target
from v4c.graph.registry import Cost

H100 = DEVICES_BY_PRODUCT["h100-sxm"]
H200 = DEVICES_BY_PRODUCT["h200-sxm"]

GEMM_META = {"BLOCK_M": (16, 32, 64, 128, 256), "BLOCK_N": (16, 32, 64, 128, 256),
             "BLOCK_K": (32, 64, 128, 256), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4, 5)}


def make_templates(name="v4c_fake_templates"):
    """A template family: a tiled GEMM and a row-blocked norm (no BLOCK_K, so no staged tiles)."""
    mod = types.ModuleType(name)
    mod.KERNELS = {"matmul": lambda *a, meta=None, **kw: None, "rmsnorm": lambda *a, meta=None, **kw: None}
    mod.META = {"matmul": dict(GEMM_META),
                "rmsnorm": {"BLOCK_N": (256, 512, 1024, 2048), "num_warps": (1, 2, 4, 8, 16, 32, 64)},
                "broken": {"BLOCK_N": ()}}
    mod.DEFAULT_META = {"matmul": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
                        "rmsnorm": {"BLOCK_N": 1024, "num_warps": 4}}

    def constraints(op, meta, shapes):
        if op == "matmul" and "K" in shapes and meta["BLOCK_K"] > shapes["K"]:
            return f"BLOCK_K={meta['BLOCK_K']} > K={shapes['K']}"
        return None

    mod.constraints = constraints
    return mod


@pytest.fixture
def tmpl(monkeypatch):
    mod = make_templates()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def gemm_cost(M, N, K, G=1, elem=2):
    return Cost(2 * G * M * N * K, G * (M * K + K * N + M * N) * elem)


# ---- devices ---------------------------------------------------------------------------------

def test_device_table_covers_every_gpu_target():
    from v4c.targets import TARGETS
    assert set(DEVICES) | {"cpu"} == set(TARGETS)
    assert device_for_target("sm90") is H100 and device_for_target("h200-sxm") is H200
    assert device_for_target("cpu").arch == "cpu"
    for bad in ("sm70", "tpu", "auto", ""):
        with pytest.raises(ValueError):
            device_for_target(bad)


@pytest.mark.parametrize("key", sorted(DEVICES_BY_PRODUCT))
def test_device_rows_are_consistent(key):
    d = DEVICES_BY_PRODUCT[key]
    assert d.arch in DEVICES and tuple(d.tflops) == devices.TFLOPS_KEYS
    assert 0 < d.smem_per_block < d.smem_per_sm <= 228 * 1024 and d.smem_per_sm - d.smem_per_block == 1024
    assert d.regs_per_sm == 65536 and d.max_warps_per_sm in (48, 64) and d.sm_count >= 72
    assert d.l2_bytes >= 6 << 20 and d.hbm_bytes >= 24 * 10 ** 9 and d.hbm_gbs >= 600
    t = d.tflops
    assert t["fp32"] > 0 and t["bf16"] == t["fp16"] and t["fp32"] <= t["tf32"] < t["bf16"]
    assert (t["fp8"] > 0) == (d.arch in ("sm89", "sm90", "sm100", "sm120"))  # FP8 tensor cores: Ada on
    assert (t["fp4"] > 0) == (d.arch in ("sm100", "sm120"))                   # FP4: Blackwell only
    for lo, hi in (("bf16", "fp8"), ("fp8", "fp4")):
        assert t[hi] == 0 or t[hi] >= 2 * t[lo] * 0.98
        if "GeForce" not in d.name:  # datacenter parts: each halving of the format doubles the rate
            assert t[hi] == 0 or t[hi] == pytest.approx(2 * t[lo], rel=0.02)
    assert hash(d) == hash(dataclasses.replace(d))
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.sm_count = 1


def test_h100_and_h200_share_the_arch_not_the_memory():
    assert H100.arch == H200.arch == "sm90" and H100.tflops == H200.tflops and H100.sm_count == H200.sm_count == 132
    assert (H100.hbm_bytes, H100.hbm_gbs) == (80 * 10 ** 9, 3350) and (H200.hbm_bytes, H200.hbm_gbs) == (141 * 10 ** 9, 4800)
    # ridge points of docs/performance.md section 1: H100 295, H200 206, B200 281 FLOP/byte (bf16)
    assert round(H100.ridge("bf16")) == 295 and round(H200.ridge("bf16")) == 206 and round(H200.ridge("fp8")) == 412
    assert round(DEVICES["sm100"].ridge("bf16")) == 281
    assert devices.device_for_properties("sm90", 132, 150_000_000_000) is H200
    assert devices.device_for_properties("sm90", 132, 85_000_000_000) is H100
    assert devices.device_for_properties("sm86", 82) is DEVICES_BY_PRODUCT["rtx3090"]
    assert devices.device_for_properties("sm86", 999) is DEVICES["sm86"]


def test_peak_falls_back_to_a_wider_format():
    a100 = DEVICES["sm80"]
    assert a100.peak_tflops("fp8") == a100.peak_tflops("bf16") == 312  # fp8 weights run as bf16 MMAs
    assert H100.peak_tflops("mxfp4") == H100.peak_tflops("e4m3") == pytest.approx(1978.9)
    assert H100.peak_tflops("f32") == 67 and H100.peak_tflops("f16") == H100.peak_tflops("bf16")
    with pytest.raises(ValueError):
        H100.peak_tflops("int3")


# ---- candidate space ---------------------------------------------------------------------------

def test_grid_order_and_split(tmpl):
    grid = space.grid(tmpl, "matmul")
    assert grid == [dict(zip(GEMM_META, c)) for c in itertools.product(*GEMM_META.values())]
    kept, pruned = space.candidates_with_reasons(tmpl, "matmul", {"M": 64, "N": 4096, "K": 1024}, H100)
    assert len(kept) + len(pruned) == len(grid) and len(kept) >= 1000
    pruned_metas = [m for m, _ in pruned]
    assert [m for m in grid if m in kept] == kept and [m for m in grid if m in pruned_metas] == pruned_metas
    assert kept[0] == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}
    # by module name, and twice in a row, the same list
    assert space.candidates(tmpl.__name__, "matmul", {"M": 64, "N": 4096, "K": 1024}, H100) == kept


def test_shared_memory_pruning_follows_the_architecture(tmpl):
    shapes = {"M": 4096, "N": 4096, "K": 4096}
    big = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 256, "num_warps": 8, "num_stages": 5}
    assert space.smem_bytes(big) == (256 * 256 * 2) * 2 * 5
    counts = {}
    for arch in ("sm86", "sm80", "sm90"):
        dev = DEVICES[arch]
        kept, pruned = space.candidates_with_reasons(tmpl, "matmul", shapes, dev)
        counts[arch] = len(kept)
        assert all(space.smem_bytes(m) <= dev.smem_per_block for m in kept)
        reasons = dict((tuple(m.values()), r) for m, r in pruned)
        assert "shared memory" in reasons[tuple(big.values())] and str(dev.smem_per_block) in reasons[tuple(big.values())]
    assert counts["sm86"] < counts["sm80"] < counts["sm90"]  # 99 KB < 163 KB < 227 KB per block
    # fp8 operands take half the bytes, so more configurations fit
    fp8 = space.candidates(tmpl, "matmul", dict(shapes, dtype="fp8"), DEVICES["sm86"])
    assert len(fp8) > counts["sm86"]
    assert len(space.candidates(tmpl, "matmul", shapes, device_for_target("cpu"))) == len(space.grid(tmpl, "matmul"))


def test_template_constraints_threads_and_quant_blocks(tmpl):
    kept, pruned = space.candidates_with_reasons(tmpl, "matmul", {"M": 64, "N": 4096, "K": 64}, H100)
    assert {m["BLOCK_K"] for m in kept} == {32, 64}
    assert any(r == "BLOCK_K=128 > K=64" for _, r in pruned)  # the template's reason is reported verbatim

    kept, pruned = space.candidates_with_reasons(tmpl, "matmul", {"M": 64, "N": 4096, "K": 1024, "quant_block": 128},
                                                 H100)
    assert kept and all(m["BLOCK_K"] % 128 == 0 for m in kept)
    assert any("quantisation block 128" in r for _, r in pruned)
    kept = space.candidates(tmpl, "matmul", {"K": 1024, "quant_block": (128, 128)}, H100)
    assert kept and all(m["BLOCK_K"] % 128 == 0 and m["BLOCK_N"] % 128 == 0 for m in kept)
    kept = space.candidates(tmpl, "matmul", {"K": 1024, "quant_block": {"BLOCK_M": 64}}, H100)
    assert {m["BLOCK_M"] for m in kept} == {64, 128, 256}

    kept, pruned = space.candidates_with_reasons(tmpl, "rmsnorm", {"N": 4096, "quant_block": 512}, H100)
    assert {m["BLOCK_N"] for m in kept} == {512, 1024, 2048}  # no BLOCK_K: the int applies to BLOCK_* keys
    assert {m["num_warps"] for m in kept} == {1, 2, 4, 8, 16, 32}
    assert any(m["num_warps"] == 64 and "2048 threads > 1024" in r for m, r in pruned)
    with pytest.raises(ValueError):
        space.candidates(tmpl, "matmul", {"quant_block": (1, 2, 3)}, H100)


def test_template_contract_errors(tmpl):
    with pytest.raises(ValueError, match="no META for op 'conv'"):
        space.candidates(tmpl, "conv", {}, H100)
    with pytest.raises(ValueError, match="non-empty tuple"):
        space.candidates(tmpl, "broken", {}, H100)
    # shapes go to the template untouched; a list form (no named entries) prunes on meta alone
    assert len(space.candidates(tmpl, "rmsnorm", [[8, 4096], [4096]], H100)) == 4 * 6


# ---- cost model --------------------------------------------------------------------------------

TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def test_more_bytes_never_cost_less_and_do_cost_more_when_memory_bound():
    shapes = {"M": 64, "N": 4096, "K": 1024}
    times = [costmodel.predict(Cost(2 * 64 * 4096 * 1024, b), TILE, shapes, H100, "bf16")
             for b in (1 << 20, 1 << 23, 1 << 25, 1 << 27)]
    assert times == sorted(times) and times[1] < times[2] < times[3] and times[-1] > 5 * times[0]
    flops = [costmodel.predict(Cost(f, 1 << 20), TILE, shapes, H100, "bf16") for f in (1e9, 1e10, 1e11, 1e12)]
    assert flops == sorted(flops) and flops[-1] > flops[0]
    # the faster memory of an H200 helps where enough bytes are in flight to use it ...
    mem, sh = gemm_cost(64, 4096, 4096), {"M": 64, "N": 4096, "K": 4096}
    deep = dict(TILE, BLOCK_N=32, num_stages=4)
    assert costmodel.predict(mem, deep, sh, H200, "bf16") < 0.8 * costmodel.predict(mem, deep, sh, H100, "bf16")
    # ... and not where too few loads are in flight to cover DRAM latency (Little's law)
    shallow = dict(TILE, num_stages=2)
    e100, e200 = (costmodel.explain(mem, shallow, sh, d, "bf16") for d in (H100, H200))
    assert e200["mem_eff"] < e100["mem_eff"] < 1 and e200["seconds"] == pytest.approx(e100["seconds"])


def test_launch_overhead_and_determinism():
    assert costmodel.predict(Cost(0, 0), {}, {}, H100, "bf16") == costmodel.LAUNCH_S == 3e-6
    c, sh = gemm_cost(4096, 4096, 1024), {"M": 4096, "N": 4096, "K": 1024}
    assert costmodel.predict(c, TILE, sh, H100, "bf16") == costmodel.predict(c, dict(TILE), dict(sh), H100, "bf16")
    # no fp8 tensor cores on an A100: the math runs at the bf16 rate (the operands stay 1 byte)
    a100 = DEVICES["sm80"]
    fp8, bf16 = (costmodel.explain(c, TILE, sh, a100, dt) for dt in ("fp8", "bf16"))
    assert fp8["t_compute"] == bf16["t_compute"] and fp8["elem_bytes"] == 1 and fp8["smem"] == bf16["smem"] // 2


def test_too_much_shared_memory_is_pruned_and_infinitely_slow(tmpl):
    shapes = {"M": 4096, "N": 4096, "K": 4096}
    cost = gemm_cost(4096, 4096, 4096)
    for dev in DEVICES_BY_PRODUCT.values():
        for op in ("matmul", "rmsnorm"):  # whatever the space keeps, the model can price
            kept, pruned = space.candidates_with_reasons(tmpl, op, shapes, dev)
            assert all(math.isfinite(costmodel.predict(cost, m, shapes, dev, "bf16")) for m in kept)
        kept, pruned = space.candidates_with_reasons(tmpl, "matmul", shapes, dev)
        smem_pruned = [m for m, r in pruned if "shared memory" in r]
        assert smem_pruned and all(costmodel.predict(cost, m, shapes, dev, "bf16") == math.inf for m in smem_pruned)
    e = costmodel.explain(cost, {"num_warps": 0}, shapes, H100, "bf16")
    assert e["seconds"] == math.inf and not e["runnable"] and "warps" in e["reason"]
    assert "at least one warp" in space.device_reason({"num_warps": 0}, shapes, H100)


def test_wave_quantisation():
    meta = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    per_tile = {}
    for tiles, (mt, nt) in ((132, (12, 11)), (133, (7, 19))):
        M, N, K = 128 * mt, 256 * nt, 8192  # compute-bound
        e = costmodel.explain(gemm_cost(M, N, K), meta, {"M": M, "N": N, "K": K}, H100, "bf16")
        assert e["tiles"] == tiles and e["t_compute"] > max(e["t_memory"], e["t_l2"])
        per_tile[tiles] = e["seconds"] / tiles
        assert e["waves"] == (1 if tiles == 132 else 2)
    assert per_tile[133] > 1.9 * per_tile[132]  # one tile too many costs a whole second wave
    # blocks resident together share an SM: a config that fits twice per SM does not coarsen the waves
    small = dict(meta, BLOCK_N=128, num_warps=4, num_stages=2)
    e = costmodel.explain(gemm_cost(1536, 1408, 8192), small, {"M": 1536, "N": 1408, "K": 8192}, H100, "bf16")
    assert e["occupancy"] >= 2 and e["waves"] == 1 and e["wave_eff"] == 1.0


def test_small_tiles_and_padding_are_penalised():
    sh = {"M": 8192, "N": 8192, "K": 8192}
    c = gemm_cost(8192, 8192, 8192)
    eff = {bm: costmodel.explain(c, dict(TILE, BLOCK_M=bm), sh, H100, "bf16")["tc_eff"] for bm in (16, 32, 64, 128)}
    assert eff[16] < eff[32] < eff[64] == eff[128] == 1.0
    t = {bm: costmodel.predict(c, dict(TILE, BLOCK_M=bm), sh, H100, "bf16") for bm in (16, 64)}
    assert t[16] > 2 * t[64]
    # M=64 rows in a 256-row block waste three quarters of the MMAs
    e = costmodel.explain(gemm_cost(64, 4096, 4096), dict(TILE, BLOCK_M=256), {"M": 64, "N": 4096, "K": 4096}, H100, "bf16")
    assert e["pad_eff"] == 0.25


def test_rank_and_what_it_prefers(tmpl):
    for shapes, check in (({"M": 4096, "N": 4096, "K": 1024}, lambda m: m["BLOCK_M"] * m["BLOCK_N"] >= 128 * 128),
                          ({"M": 64, "N": 4096, "K": 1024}, lambda m: m["BLOCK_M"] <= 64)):
        cands = space.candidates(tmpl, "matmul", shapes, H100)
        ranked = costmodel.rank(cands, gemm_cost(shapes["M"], shapes["N"], shapes["K"]), shapes, H100, "bf16")
        secs = [s for _, s in ranked]
        assert secs == sorted(secs) and len(ranked) == len(cands)
        assert check(ranked[0][0]), ranked[0]  # prefill wants big tiles; decode does not pad M=64


# ---- buckets -----------------------------------------------------------------------------------

def test_buckets():
    assert buckets.bucket_for(48, 100_000) == "T=64,L=131072"
    assert buckets.bucket_for(1, None) == "T=1" and buckets.bucket_for(64, None) == "T=64"
    assert buckets.bucket_for(65, None) == "T=128" and buckets.bucket_for(None, 0) == "L=4096"
    assert buckets.bucket_for(None, None) == ""
    assert [buckets.context_bucket(x) for x in (1, 4096, 4097, 8192, 200_000, 1 << 20, (1 << 20) + 1)] == \
        [4096, 4096, 8192, 8192, 262144, 1 << 20, 1 << 21]
    for bad in ((0, None), (-1, None), (None, -5), (2.5, None), (True, None)):
        with pytest.raises(ValueError):
            buckets.bucket_for(*bad)
    assert buckets.parse_bucket("T=64,L=131072") == (64, 131072)
    assert buckets.parse_bucket("L=4096") == (None, 4096) and buckets.parse_bucket("") == (None, None)
    for t, l in ((3, 5000), (1000, None), (None, 300_000)):
        assert buckets.parse_bucket(buckets.bucket_for(t, l)) == (
            None if t is None else buckets.token_bucket(t), None if l is None else buckets.context_bucket(l))
    for bad in ("T=x", "T=1,T=2", "Q=3", "T=0", "T=4;L=8", "64"):
        with pytest.raises(ValueError):
            buckets.parse_bucket(bad)


def test_nearest_bucket():
    avail = ["T=1,L=4096", "T=16,L=4096", "T=64,L=131072", "T=256,L=1048576"]
    assert buckets.nearest("T=64,L=131072", avail) == "T=64,L=131072"
    assert buckets.nearest("T=32,L=131072", avail) == "T=64,L=131072"          # 1 step in T
    assert buckets.nearest("T=8,L=8192", avail) == "T=16,L=4096"               # 1 + 1 steps, vs 3 + 1
    assert buckets.nearest("T=8", ["T=4", "T=16"]) == "T=16"                    # tie: the larger bucket
    assert buckets.nearest("T=8", ["T=16", "T=4"]) == "T=16"
    assert buckets.nearest("T=8", ["L=4096", "T=4,L=4096"]) is None             # different parts: not comparable
    assert buckets.nearest("T=8", []) is None
    assert buckets.nearest("T=2048,L=1048576", avail) == "T=256,L=1048576"
    with pytest.raises(ValueError):
        buckets.nearest("bogus", avail)


# ---- search ------------------------------------------------------------------------------------

def counting(table):
    """An objective over a recorded table that counts its calls and refuses unknown candidates."""
    calls = []

    def objective(meta):
        key = search.meta_key(meta)
        assert key in table, f"evaluated a candidate outside the list: {meta}"
        calls.append(key)
        return table[key]

    return objective, calls


@pytest.fixture(scope="module")
def small_space():
    cands = [dict(zip(("BLOCK_M", "BLOCK_N", "num_warps"), c))
             for c in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (2, 4, 8))]
    table = {search.meta_key(m): 1e-6 * (1 + abs(math.log2(m["BLOCK_M"] / 64)) + abs(math.log2(m["BLOCK_N"] / 128))
                                     + (m["num_warps"] != 4) * 0.5) for m in cands}
    return cands, table


def test_exhaustive_and_random(small_space):
    cands, table = small_space
    obj, calls = counting(table)
    r = search.search("exhaustive", cands + cands[:5], obj)  # repeats are measured once
    assert r.best_meta == {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4} and r.best_seconds == 1e-6
    assert len(calls) == len(set(calls)) == len(cands) == r.evaluations and {s for _, _, s in r.trials} == {"ok"}
    runs = []
    for seed in (0, 0, 1):
        obj, calls = counting(table)
        runs.append(search.search("random", cands, obj, budget=10, seed=seed))
        assert len(calls) == len(set(calls)) == 10
    assert runs[0].trials == runs[1].trials != runs[2].trials
    assert runs[0].best_seconds == min(s for _, s, _ in runs[0].trials)


def test_tpe_stays_in_the_list_and_is_deterministic(small_space):
    cands, table = small_space
    sparse = [m for i, m in enumerate(cands) if i % 3 != 1]  # a third of the grid is infeasible
    results = []
    for seed in (7, 7, 8):
        obj, calls = counting(table)
        r = search.search("tpe", sparse, obj, budget=12, seed=seed)
        assert len(calls) == len(set(calls)) == 12 == r.evaluations
        assert r.best_meta in sparse and r.best_seconds == min(s for _, s, _ in r.trials)
        results.append(r)
    assert results[0].trials == results[1].trials and results[0].trials != results[2].trials
    assert any(r.skipped for r in results)  # TPE did propose pruned or repeated combinations; none was run
    obj, calls = counting(table)
    r = search.tpe(sparse, obj, budget=10 ** 6, seed=0)  # a budget over the list measures the list
    assert len(calls) == len(sparse) and r.best_seconds == min(table[search.meta_key(m)] for m in sparse)


def test_failed_candidates(small_space):
    cands, table = small_space
    best = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4}
    obj = lambda m: None if m["num_warps"] == 4 else table[search.meta_key(m)]  # noqa: E731
    for strategy in ("exhaustive", "random", "tpe"):
        r = search.search(strategy, cands, obj, budget=20, seed=1)
        assert r.best_meta != best and r.best_meta["num_warps"] != 4
        assert all((s is None) == (st == "failed") for _, s, st in r.trials)
    r = search.search("exhaustive", cands, lambda m: None)
    assert r.best_meta is None and r.best_seconds is None and r.evaluations == len(cands)
    r = search.search("tpe", cands, lambda m: float("nan"), budget=5)
    assert r.best_meta is None and {st for _, _, st in r.trials} == {"failed"} and r.evaluations == 5


def test_search_arguments(small_space):
    cands, table = small_space
    obj, _ = counting(table)
    with pytest.raises(ValueError, match="unknown search strategy"):
        search.search("anneal", cands, obj)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError):
            search.search("random", cands, obj, budget=bad)
    with pytest.raises(ValueError, match="no candidates"):
        search.search("tpe", [], obj, budget=3)
    with pytest.raises(ValueError, match="different meta keys"):
        search.tpe([{"a": 1, "b": 1}, {"a": 2}, {"a": 3, "b": 1}], lambda m: 1.0, budget=2)


def test_tpe_is_quiet():
    import optuna
    before = optuna.logging.get_verbosity()
    cands = [{"x": x, "y": y, "mode": mo} for x in range(8) for y in range(8) for mo in ("a", "b")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = search.tpe(cands, lambda m: (m["x"] - 3) ** 2 + (m["y"] - 5) ** 2 + (m["mode"] == "b") + 1.0, budget=40)
    assert not [w for w in caught if "optuna" in (w.filename + str(w.message)).lower()]
    assert optuna.logging.get_verbosity() == before
    assert r.best_seconds <= 2.0  # found (3, 5) or a neighbour in 40 of 128


# ---- the headline: TPE on recorded cost-model timing tables ------------------------------------

SEEDS = (0, 1, 2, 3, 4)
TABLES = {
    # V4-Flash attention/shared-expert projection at decode: 64 tokens, hidden 4096 -> 1024-wide K
    "v4-flash projection M=64 N=4096 K=1024 (H200)": ({"M": 64, "N": 4096, "K": 1024}, H200),
    # MoE grouped GEMM at prefill: 8 active experts x 512 tokens each, gate+up (2 x 2048) over hidden 4096
    "MoE grouped GEMM G=8 M=512 N=4096 K=4096 (H100)": ({"G": 8, "M": 512, "N": 4096, "K": 4096}, H100),
}


@pytest.fixture(scope="module")
def recorded():
    mod = make_templates("v4c_fake_templates_recorded")
    out = {}
    for name, (shapes, dev) in TABLES.items():
        cands = space.candidates(mod, "matmul", shapes, dev)
        cost = gemm_cost(shapes["M"], shapes["N"], shapes["K"], shapes.get("G", 1))
        table = {search.meta_key(m): costmodel.predict(cost, m, shapes, dev, "bf16") for m in cands}
        out[name] = (cands, table)
    return out


def regrets(strategy, cands, table, budget):
    best = min(table.values())
    out = []
    for seed in SEEDS:
        obj, calls = counting(table)
        r = search.search(strategy, cands, obj, budget=budget, seed=seed)
        assert len(calls) == len(set(calls)) == budget == r.evaluations
        out.append(r.best_seconds / best - 1)
    return out


@pytest.mark.parametrize("name", list(TABLES))
def test_tpe_regret_on_recorded_tables(recorded, name):
    cands, table = recorded[name]
    best = min(table.values())
    assert len(cands) >= 200 and all(math.isfinite(v) for v in table.values())
    assert search.exhaustive(cands, counting(table)[0]).best_seconds == best
    near = sum(v <= 1.02 * best for v in table.values())
    print(f"\n{name}: {len(cands)} candidates, best {best * 1e6:.2f} us, "
          f"{near} ({100 * near / len(cands):.1f}%) within 2% of it")
    rows = {}
    for div in (4, 32):
        budget = len(cands) // div
        for strategy in ("tpe", "random"):
            r = regrets(strategy, cands, table, budget)
            rows[(div, strategy)] = r
            print(f"  {strategy:6s} budget {budget:4d} (n/{div:<2d}): regret mean {100 * statistics.mean(r):.3f}% "
                  f"max {100 * max(r):.3f}% over seeds {SEEDS}")
    # the claim: a quarter of the candidates is enough for TPE to land within 2% on every seed
    assert max(rows[(4, "tpe")]) <= 0.02
    # and at an eighth of that budget TPE still does no worse than random sampling on average
    assert statistics.mean(rows[(32, "tpe")]) <= statistics.mean(rows[(32, "random")])
