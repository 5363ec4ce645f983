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
                 "--dtype", "bf16"]) == 0
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
