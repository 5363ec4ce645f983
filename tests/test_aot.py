"""Ahead-of-time compilation for real GPU targets, without a GPU (v4c/aot): every kernel launch of an
artifact is compiled by Triton's own compiler for the target, checked against its shared memory, and its
config chosen from what compiles; failures name the kernel, the config and the compiler's message; the
per-bucket config tables run under the interpreter exactly as one config does."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import v4c
from v4c.aot.build import AOTError
from v4c.aot.targets import shared_memory_limit
from v4c.codegen import emit as E
from v4c.inspect import inspect_artifact
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint

pytest.importorskip("triton")

BUCKETS = ["B=1,T=1", "B=1,T=512"]


def _config_dir(tmp_path, **over):
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**tiny_config_dict(), **over}))
    return d


@pytest.fixture(scope="module")
def tiny_sm90(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot90")
    return v4c.compile(_config_dir(root), root / "a.v4c", target="sm90", dtype="bf16", buckets=BUCKETS)


@pytest.mark.parametrize("target", ["sm80", "sm90", "sm100"])
def test_every_launch_of_a_small_model_compiles_and_fits(target, tmp_path, tiny_sm90):
    art = tiny_sm90 if target == "sm90" else v4c.compile(_config_dir(tmp_path), tmp_path / "a.v4c", target=target,
                                                          dtype="bf16", buckets=BUCKETS)
    man = json.loads((art / "manifest.json").read_text())
    aot = man["aot"]
    assert aot["target"] == target and aot["fallback"] == 0
    limit = shared_memory_limit(target)
    assert aot["launches"] and all(x["ok"] and x["shared_bytes"] <= limit for x in aot["launches"])
    assert all(x["spill_bytes"] == 0 for x in aot["launches"]), [x for x in aot["launches"] if x["spill_bytes"]]
    sites = man["kernels"]["sites"]
    for sid, s in sites.items():  # every kernel site has a compiled config per bucket
        if s["module"] is None:
            continue
        assert sorted(s["configs"]) == sorted(BUCKETS), sid
        for b in BUCKETS:
            assert any(x["site"] == sid and x["bucket"] == b for x in aot["launches"]), (sid, b)
    for key, b in aot["binaries"].items():  # the binaries travel in the artifact, hashed like every file
        assert any(f.endswith(".cubin") for f in b["files"])
        for f in b["files"]:
            assert f"{b['dir']}/{f}" in man["files"]
    rows = inspect_artifact(art)["aot"]
    assert len(rows) == len(aot["launches"])
    assert set(rows[0]) == {"kernel", "op", "site", "bucket", "target", "ok", "registers", "spill_bytes",
                            "shared_bytes", "num_warps", "num_stages"}


def _break_kernel(monkeypatch):
    """hc_expand's kernel rendered with a statement the real compiler rejects."""
    real = E.render

    def render(family, target):
        src = real(family, target)
        if family == "mhc":
            head = "def _hc_expand_kernel("
            i = src.index(head)
            body = src.index('"""', src.index('"""', i) + 3) + 3  # after the docstring
            src = src[:body] + "\n    tl.static_assert(False, 'injected failure')" + src[body:]
        return src

    monkeypatch.setattr(E, "render", render)


def test_a_launch_that_does_not_compile_fails_the_compile_with_the_kernel_config_and_message(tmp_path, monkeypatch):
    _break_kernel(monkeypatch)
    with pytest.raises(AOTError) as e:
        v4c.compile(_config_dir(tmp_path), tmp_path / "a.v4c", target="sm90", dtype="bf16", buckets=["B=1,T=1"])
    msg = str(e.value)
    assert "hc_expand" in msg and "_hc_expand_kernel" in msg and "injected failure" in msg and "BLOCK_D" in msg
    assert "--allow-fallback" in msg
    assert not (tmp_path / "a.v4c").exists()


def test_allow_fallback_routes_the_launch_to_the_reference_and_says_so(tmp_path, monkeypatch):
    _break_kernel(monkeypatch)
    logs = []
    art = v4c.compile(_config_dir(tmp_path), tmp_path / "a.v4c", target="sm90", dtype="bf16", buckets=["B=1,T=1"],
                      allow_fallback=True, log=logs.append)
    sites = json.loads((art / "manifest.json").read_text())["kernels"]["sites"]
    (site,) = [s for s in sites.values() if s["op"] == "hc_expand"]
    assert site["configs"]["B=1,T=1"]["config_source"] == "reference"
    assert "injected failure" in site["configs"]["B=1,T=1"]["reason"]
    assert any("on the reference" in m and "hc_expand" in m for m in logs)
    assert all(s["configs"]["B=1,T=1"]["config_source"] != "reference" for s in sites.values()
               if s["op"] != "hc_expand" and s["module"])


def test_shipped_binaries_are_the_ones_a_launch_of_the_same_toolchain_finds(tiny_sm90, tmp_path):
    """After the artifact's binaries are installed into an empty Triton cache, compiling a launch the way a
    GPU would at run time is a cache hit for every launch of a site: the AOT keys are Triton's own."""
    script = textwrap.dedent(f"""
        import json, importlib.util, sys
        import triton
        from pathlib import Path
        from v4c.aot.capture import capture
        from v4c.aot.launches import _source_and_options
        from v4c.aot.targets import gpu_target
        from v4c.autotune.choose import concrete
        from v4c.backends.triton import install_binaries
        root = Path({str(tiny_sm90)!r})
        man = json.loads((root / "manifest.json").read_text())
        assert install_binaries(root, man["aot"], "sm90") == len(man["aot"]["binaries"]) > 0
        assert install_binaries(root, man["aot"], "sm80") == 0  # another GPU compiles as usual
        hits = []
        triton.knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
        sid, site = next((k, s) for k, s in man["kernels"]["sites"].items() if s["op"] == "sparse_attention")
        mod_entry = man["kernels"]["modules"][site["module"]]
        spec = importlib.util.spec_from_file_location("v4c_kernels_x", root / mod_entry["file"])
        mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
        from v4c.graph.text import parse_graph
        from v4c.graph.sites import call_sites
        from v4c.artifact.shapes import parse_bucket
        graph = parse_graph((root / "graph.v4c").read_text())
        node = call_sites(graph)[sid][0]
        ins, _ = concrete(graph, node, parse_bucket("B=1,T=1"), man["kernels"]["context"])
        task = {{"launcher": [site["launcher"], node.op], "attrs": node.attr,
                "inputs": [{{"dtype": c.dtype, "shape": list(c.shape)}} for c in ins],
                "meta": site["configs"]["B=1,T=1"]["meta"]}}
        for x in capture(mod, task, "sm90"):
            src, _, options = _source_and_options(x, "sm90")
            triton.compile(src, target=gpu_target("sm90"), options=options.__dict__)
        print(json.dumps(hits))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    hits = json.loads(out.stdout.strip().splitlines()[-1])
    assert hits and all(hits), hits


def test_two_buckets_with_different_configs_give_the_results_of_one(tmp_path, monkeypatch):
    """Per-shape configs under the interpreter: prefill calls take one bucket's config, decode calls the
    other's; the logits equal those of an artifact with a single config."""
    from v4c.autotune import choose
    from v4c.backends import triton as K
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck", seed=1)
    one = v4c.compile(ck, tmp_path / "one", target="cpu", tuning_cache=False, buckets=["B=1,T=1"])
    real = choose.site_candidates

    def per_bucket(graph, site, node, bucket, *args, **kw):
        cands = real(graph, site, node, bucket, *args, **kw)
        if site["op"] == "hc_post_pre" and not bucket.decode:  # another tile for prefill calls
            meta = {**cands[0]["meta"], "BLOCK_T": 2 * cands[0]["meta"]["BLOCK_T"]}
            return [{"meta": meta, "config_source": "test"}]
        return cands

    monkeypatch.setattr(choose, "site_candidates", per_bucket)
    two = v4c.compile(ck, tmp_path / "two", target="cpu", tuning_cache=False, buckets=["B=1,T=1", "B=1,T=512"])
    site = next(s for s in json.loads((two / "manifest.json").read_text())["kernels"]["sites"].values()
                if s["op"] == "hc_post_pre")
    decode, prefill = site["configs"]["B=1,T=1"]["meta"], site["configs"]["B=1,T=512"]["meta"]
    assert decode != prefill
    used = []
    real_site = K._site_impl

    def spy(modules, s):  # note the BLOCK_T of every hc_post_pre launch
        if s["op"] == "hc_post_pre":
            table = getattr(modules[s["module"]], s["launcher"])
            launcher = table[s["op"]]

            def watch(*args, meta, **attrs):
                used.append(meta["BLOCK_T"])
                return launcher(*args, meta=meta, **attrs)

            monkeypatch.setitem(table, s["op"], watch)
        return real_site(modules, s)

    monkeypatch.setattr(K, "_site_impl", spy)
    ids = torch.randint(0, 1024, (1, 7), generator=torch.Generator().manual_seed(2))
    outs = {}
    for name, art in (("one", one), ("two", two)):
        sess = v4c.load(art, device="cpu", backend="triton").new_session()
        logits = [sess.forward(ids)]
        logits.append(sess.forward(logits[0][:, -1:].argmax(-1)))
        outs[name] = logits
    assert prefill["BLOCK_T"] in used and decode["BLOCK_T"] in used
    for a, b in zip(outs["one"], outs["two"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rendered_modules_define_every_name_once():
    for fam in E.FAMILIES:
        E.render(fam, "sm90")  # raises on a name defined twice
    with pytest.raises(ValueError, match="'_pow2' is defined twice"):
        E._check_unique("x", "def _pow2(e):\n    pass\n\n_pow2 = 3\n")


@pytest.mark.parametrize("over", [
    {},
    {"head_dim": 32, "q_lora_rank": 48, "hidden_size": 96, "o_lora_rank": 32},  # norm widths below 64, not powers of 2
    {"hidden_size": 320, "moe_intermediate_size": 96, "index_head_dim": 64, "num_attention_heads": 3},
])
def test_every_call_site_of_a_valid_model_has_a_valid_candidate(over, tmp_path):
    """Whatever the widths, each kernel site has at least one config its template accepts, at every bucket
    and for every GPU target (the default included), so neither compile nor tune is left without one."""
    from v4c.artifact.shapes import default_buckets
    from v4c.autotune.choose import site_candidates, site_shapes
    from v4c.graph.sites import call_sites
    from v4c.model.build import build_graph
    from v4c.model.config import V4Config
    from v4c.passes import PassManager, default_pipeline
    cfg = V4Config.from_dict({**tiny_config_dict(), **over})
    graph = PassManager(default_pipeline(True, "bf16", "bf16")).run(build_graph(cfg, "bf16"))
    em = E.emit(graph, "sm90")
    nodes = {sid: ns[0] for sid, ns in call_sites(graph).items()}
    for target in ("sm80", "sm90"):
        for sid, site in em.sites.items():
            mod = E.template(site["module"])
            for b in default_buckets():
                cands = site_candidates(graph, site, nodes[sid], b, 4096, target, None)
                shapes = site_shapes(graph, nodes[sid], b, 4096)
                ok = [c for c in cands if mod.constraints(site["kernel"], c["meta"], shapes) is None]
                assert ok, (target, sid, b.key, [mod.constraints(site["kernel"], c["meta"], shapes) for c in cands])
