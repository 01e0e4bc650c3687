"""The command line as a user meets it: ``--version``, ``--help`` of every command, and how errors are prefixed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from timmface.cli import build_parser, main

# markup that belongs in docstrings, not in a terminal: RST literals and roles, and a '%%' that argparse shows as is
MARKUP = re.compile(r"``|:(?:func|class|mod|meth|attr|data):`|%%")


def _parsers(parser: argparse.ArgumentParser, name: str = "timmface") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree with its full command name, the top level first."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


PARSERS = _parsers(build_parser())


def test_the_tree_holds_every_command():
    names = {name for name, _ in PARSERS}
    assert {"timmface data pack", "timmface data shards", "timmface ckpt merge", "timmface teachers inspect"} <= names
    assert {"timmface train", "timmface eval", "timmface embed", "timmface export", "timmface report"} <= names


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_command_has_a_description_and_plain_text_help(name: str, parser: argparse.ArgumentParser):
    text = parser.format_help()
    assert parser.description and parser.description.strip(), f"{name}: no description"
    assert not MARKUP.search(text), f"{name}: markup in --help: {MARKUP.search(text).group(0)!r}"
    undocumented = [
        a.option_strings[0] if a.option_strings else a.dest
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
        and not (a.help and a.help.strip())
    ]
    assert not undocumented, f"{name}: arguments without help: {undocumented}"


@pytest.mark.parametrize("command", ["eval", "embed"])
def test_batch_size_help_says_what_it_is(command: str):
    parser = dict(PARSERS)[f"timmface {command}"]
    action = next(a for a in parser._actions if "--batch-size" in a.option_strings)
    assert "default" in action.help and "images" in action.help


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"timmface {version('timmface')}"


@pytest.mark.parametrize(
    "argv,prefix",
    [
        (["data", "pack", "{tmp}/none", "{tmp}/out"], "timmface data pack: error: "),
        (["data", "inspect", "{tmp}/none"], "timmface data inspect: error: "),
        (["ckpt", "merge", "{tmp}/none"], "timmface ckpt merge: error: "),
        (["teachers", "inspect", "{tmp}/none"], "timmface teachers inspect: error: "),
        (["report", "{tmp}/none"], "timmface report: error: "),
    ],
)
def test_errors_name_the_full_subcommand(argv: list[str], prefix: str, tmp_path: Path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err


def test_shards_pattern_shown_in_its_help_works(tmp_path: Path, capsys):
    """The example pattern of ``data shards --help``, typed as shown, writes shards (it was '%%06d', a crash)."""
    from tests.conftest import write_toy_dataset

    help_text = dict(PARSERS)["timmface data shards"].format_help()
    example = re.search(r"e\.g\. (\S+\.tar)", help_text).group(1)
    data = write_toy_dataset(tmp_path / "toy", num_classes=3, per_class=4)
    pattern = str(tmp_path / example)
    assert main(["data", "shards", str(data), pattern, "--max-count", "5"]) == 0
    written = sorted(p.name for p in Path(pattern).parent.glob("*.tar"))
    assert written == [Path(pattern % i).name for i in range(3)]  # 12 samples, 5 per shard


@pytest.mark.parametrize("pattern", ["faces-%%06d.tar", "faces.tar", "faces-%06d-%s.tar", "faces-%d-%d.tar"])
def test_shards_pattern_without_exactly_one_number_field_is_one_line(pattern: str, tmp_path: Path, capsys):
    from tests.conftest import write_toy_dataset

    data = write_toy_dataset(tmp_path / "toy", num_classes=2, per_class=2)
    assert main(["data", "shards", str(data), str(tmp_path / pattern)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timmface data shards: error: ") and err.count("\n") == 1
    assert "%06d" in err  # says what a good pattern looks like
    assert not list(tmp_path.glob("*.tar"))
