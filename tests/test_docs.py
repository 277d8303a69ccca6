"""The docs say what the code does: the generated serve table, the README's commands and
every module path the docs name are checked against the code (no root needed)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from broker import config
from xsk_broker.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name (aliases included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def readme_commands() -> list[list[str]]:
    """The words after `xsk-broker` on each line of the README's shell blocks, up to the
    first flag or placeholder."""
    text = (REPO / "README.md").read_text()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("xsk-broker "):
                words = []
                for word in line.split()[1:3]:
                    if not re.fullmatch(r"[a-z][a-z-]*", word):
                        break
                    words.append(word)
                found.append(words)
    return found


def test_operations_holds_the_serve_table_verbatim() -> None:
    """`serve`'s flags are made from ServeConfig; the table operators read must be too."""
    assert config.markdown_table() in (REPO / "docs" / "operations.md").read_text(), (
        "docs/operations.md is out of date: paste `python -m broker.config` into "
        "its 'Serve settings' section"
    )


def test_every_readme_command_exists() -> None:
    commands = subcommands(build_parser())
    seen = readme_commands()
    assert len(seen) > 5
    for words in seen:
        if not words:  # `xsk-broker --version`
            continue
        assert words[0] in commands, f"README names `xsk-broker {words[0]}`, the CLI has not"
        nested = subcommands(commands[words[0]])
        if nested and len(words) > 1:
            assert words[1] in nested, f"README names `xsk-broker {' '.join(words)}`"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_module_paths_named_in_docs_exist(doc: Path) -> None:
    """Modules move (client/transport.py, broker/netlab.py did); a doc naming one that is
    gone points readers at nothing."""
    named = set(re.findall(r"\b((?:broker|client|lab|xsk_broker)/\w+\.py)\b", doc.read_text()))
    assert sorted(p for p in named if not (REPO / p).exists()) == []
