"""The command line, run as a user would (in-process through main, and once as a subprocess)."""
import json
import subprocess
import sys

from v4c.cli import main
from v4c.model.presets import FLASH_HUB_CONFIG


def test_inspect_text_and_json(tiny_artifact, capsys):
    assert main(["inspect", str(tiny_artifact)]) == 0
    out = capsys.readouterr().out
    assert "schedule   sliding csa hca csa" in out
    assert main(["inspect", str(tiny_artifact), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layers"] == {"sliding": 1, "csa": 2, "hca": 1} and r["runnable"] is True
    assert r["params"] > 0 and r["ops"]["sparse_attention"] == 4 and r["passes"] == ["fuse-moe", "fuse-attention", "fuse-projections", "fuse-mhc"]
    assert main(["inspect", str(tiny_artifact), "--graph"]) == 0
    from v4c.graph import parse_graph, verify
    assert len(verify(parse_graph(capsys.readouterr().out)).nodes) == r["nodes"]


def test_run_prints_tokens(tiny_artifact, capsys):
    assert main(["run", str(tiny_artifact), "--prompt-ids", "1 2 3", "--max-new-tokens", "5"]) == 0
    toks = capsys.readouterr().out.split()
    assert len(toks) == 5 and all(0 <= int(t) < 1024 for t in toks)


def test_run_bad_prompt_is_a_clear_error(tiny_artifact, capsys):
    assert main(["run", str(tiny_artifact), "--prompt-ids", "1 x", "--max-new-tokens", "2"]) == 2
    assert "--prompt-ids must be integers" in capsys.readouterr().err
    assert main(["run", str(tiny_artifact), "--prompt-ids", "99999", "--max-new-tokens", "2"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["run", str(tiny_artifact), "--prompt", "hello"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_weight_free_compile_of_flash(tmp_path, capsys):
    (tmp_path / "flash").mkdir()
    (tmp_path / "flash" / "config.json").write_text(json.dumps(FLASH_HUB_CONFIG))
    assert main(["compile", str(tmp_path / "flash"), "-o", str(tmp_path / "art"), "--target", "sm90",
                 "--dtype", "bf16", "--no-aot"]) == 0  # AOT of Flash is covered by tests/test_aot.py
    assert main(["inspect", str(tmp_path / "art"), "--json"]) == 0
    compiled_path, report = capsys.readouterr().out.split("\n", 1)  # compile prints the path first
    r = json.loads(report)
    assert compiled_path == str(tmp_path / "art")
    assert r["target"] == "sm90" and r["runnable"] is False and r["layers"]["csa"] == 21
    assert main(["run", str(tmp_path / "art"), "--prompt-ids", "1"]) == 2
    assert "weight-free" in capsys.readouterr().err


def test_prompt_with_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from v4c.model.presets import tiny_config_dict
    from v4c.model.random_weights import write_random_checkpoint
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck")
    vocab = {f"w{i}": i for i in range(1024)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(str(ck / "tokenizer.json"))
    assert main(["compile", str(ck), "-o", str(tmp_path / "art")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "art"), "--prompt", "w1 w2 w3", "--max-new-tokens", "3"]) == 0
    assert "w" in capsys.readouterr().out


def test_demo_runs_as_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "v4c.cli", "demo", "--new-tokens", "4"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "generated" in r.stdout and "decode" in r.stdout


def test_every_argument_of_every_subcommand_is_described():
    import argparse

    from v4c.cli import build_parser
    missing = []

    def walk(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for n, sp in a.choices.items():
                    walk(sp, f"{name} {n}")
            elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)) and not a.help:
                missing.append(f"{name} {a.option_strings or a.dest}")

    walk(build_parser(), "v4c")
    assert missing == []


def test_cache_options_go_before_or_after_the_subcommand(tmp_path, capsys):
    from v4c.cli import main
    for argv in (["cache", "--cache", str(tmp_path / "a.sqlite"), "export", "-o", str(tmp_path / "a.json")],
                 ["cache", "export", "--cache", str(tmp_path / "b.sqlite"), "-o", str(tmp_path / "b.json")]):
        assert main(argv) == 0
    assert (tmp_path / "b.sqlite").exists() and (tmp_path / "b.json").exists()
    assert "local -> server" in build_help("cache") and "server -> local" in build_help("cache")
    assert "torch" in build_help("run").split("--backend")[1]


def build_help(cmd: str) -> str:
    import contextlib
    import io

    from v4c.cli import build_parser
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([*cmd.split(), "--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines


def test_init_writes_a_directory_that_compiles_and_refuses_what_it_should_not_do(tmp_path, capsys):
    import json

    from v4c.cli import main
    from v4c.model.presets import FLASH_HUB_CONFIG
    assert main(["init", str(tmp_path / "tiny"), "--weights", "random"]) == 0
    assert main(["compile", str(tmp_path / "tiny"), "-o", str(tmp_path / "tiny.v4c"), "--target", "cpu"]) == 0
    assert main(["run", str(tmp_path / "tiny.v4c"), "--prompt-ids", "1 2 3", "--max-new-tokens", "2"]) == 0
    assert main(["init", str(tmp_path / "flash"), "--preset", "v4-flash"]) == 0
    assert json.loads((tmp_path / "flash" / "config.json").read_text()) == FLASH_HUB_CONFIG
    capsys.readouterr()
    assert main(["init", str(tmp_path / "tiny")]) == 2  # not empty: nothing overwritten
    assert "not empty" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "big"), "--preset", "v4-pro", "--weights", "random"]) == 2
    assert "GB" in capsys.readouterr().err and not (tmp_path / "big").exists()
