"""Imports point one way: the wire contract <- client <- lab <- xsk_broker, and the daemon
never imports a client, the lab or the command line. Read from the source (every import,
also those inside functions), so an import added anywhere is caught before it runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "client", "lab", "xsk_broker")
WIRE_CONTRACT = {"broker.protocol", "broker.errors", "broker.fdpass"}
# What each package may import from the project, besides itself.
ALLOWED: dict[str, set[str] | None] = {
    "broker": set(),
    "client": WIRE_CONTRACT,
    "lab": None,  # broker and client, never xsk_broker
    "xsk_broker": None,
}
NEVER = {"lab": {"xsk_broker"}, "xsk_broker": set()}


def project_imports(path: Path) -> set[str]:
    """The project modules path imports, as dotted names ("broker.protocol", "client")."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [
                f"{node.module}.{alias.name}"
                for alias in node.names
                if _is_module(f"{node.module}.{alias.name}")
            ]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def _is_module(name: str) -> bool:
    path = REPO / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


def violations(package: str, imports: set[str]) -> list[str]:
    bad = []
    for name in imports:
        top = name.split(".")[0]
        if top == package:
            continue
        allowed = ALLOWED[package]
        if allowed is None:
            if top in NEVER[package]:
                bad.append(name)
        elif not any(name == a or name.startswith(a + ".") for a in allowed) and not (
            # "from broker import fdpass" names broker itself too
            name == top and any(a.startswith(top + ".") for a in allowed)
        ):
            bad.append(name)
    return sorted(bad)


@pytest.mark.parametrize(
    "path", [p for pkg in PACKAGES for p in modules_of(pkg)], ids=lambda p: str(p.relative_to(REPO))
)
def test_imports_point_one_way(path: Path) -> None:
    package = path.parent.name
    assert violations(package, project_imports(path)) == []


def test_the_wire_contract_needs_only_the_standard_library() -> None:
    for name in WIRE_CONTRACT:
        path = REPO / (name.replace(".", "/") + ".py")
        assert project_imports(path) <= WIRE_CONTRACT | {"broker"}, name


def test_the_checker_catches_each_wrong_direction(tmp_path: Path) -> None:
    """The rule itself, on imports written the ways that matter."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import client.sync\nfrom broker import server\ndef later():\n    from lab import netlab\n"
    )
    assert violations("broker", project_imports(bad)) == ["client.sync", "lab", "lab.netlab"]
    assert violations("client", project_imports(bad)) == ["broker.server", "lab", "lab.netlab"]
    assert violations("lab", {"xsk_broker.cli"}) == ["xsk_broker.cli"]
    assert violations("client", {"broker", "broker.fdpass", "broker.errors"}) == []
