"""The README's two set-up commands are what CI runs, verbatim: one for the demo, one for the tests."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text[text.index("## Set up on a fresh machine"):]
    setup = setup[:setup.index("\n## ", 5)]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, re.S)]


def test_readme_has_a_demo_and_a_test_command():
    demo, tests = _readme_commands()[:2]
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("v4c demo")
    assert tests.startswith("python3 -m venv .venv") and tests.endswith("python -m pytest -q")


def test_ci_runs_both_readme_commands_verbatim_demo_first():
    demo, tests = _readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [ln for ln in ci.splitlines() if "python3 -m venv .venv" in ln]
    assert len(lines) == 2, lines
    assert f"&& {demo})" in lines[0] and f"&& {tests})" in lines[1]
