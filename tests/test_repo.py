"""Repository contract: README's commands, CI running exactly the README's test command, layout."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block, "README has no bash block"
    return [line for line in first_block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_first_screen_has_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    demo, tests = _readme_commands()[:2]
    assert "timmface train --config configs/demo.yaml" in demo and demo in head
    assert "pytest" in tests and tests in head
    assert (ROOT / "configs" / "demo.yaml").is_file()


def test_ci_runs_the_readme_test_command_verbatim():
    tests_cmd = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests_cmd in ci


def test_top_level_layout():
    for name in ("timmface", "teachers", "students", "configs", "tests", "benchmarks", "pyproject.toml", "README.md"):
        assert (ROOT / name).exists(), name


def test_no_code_execution_from_inputs():
    """No eval/exec, no plain pickle loads, no unsafe torch.load outside tests."""
    pattern = re.compile(r"(^|[^.\w])(eval|exec)\(|pickle\.loads?\(|weights_only\s*=\s*False")
    offenders = []
    for folder in ("timmface", "teachers", "students"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line.split("#")[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders
