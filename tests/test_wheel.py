"""The project installs like any Python tool: `python -m build` makes an sdist and, from it, a
wheel; pip installs that wheel into a clean venv of Debian's Python, offline (--no-index,
no pip configuration, no cache), and the `xsk-broker` there works: --version, doctor,
install-units, and the demo (the whole product, as root).

Root: the dependency wheels are built once into the lab cache (scripts/dependency-wheels.sh,
the only step that needs the network), and the demo makes namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, run_captured

from broker import units
from lab import cache as labcache
from lab.brokerproc import public_tempdir

pytestmark = pytest.mark.kernel
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def dependency_wheels() -> Path:
    script = REPO / "scripts" / "dependency-wheels.sh"
    requirements = PROJECT["dependencies"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = labcache.entry(
        "wheels", script.read_bytes(), "\n".join(requirements).encode(), python.encode()
    )
    argv = ["sh", str(script)]
    return labcache.ensure(
        path, lambda dest: [*argv, str(dest), sys.executable, *requirements], 600
    )


def offline_pip_env() -> dict[str, str]:
    """This machine's pip settings (extra indexes, find-links, constraints) removed: what a
    clean install sees, with nothing to fall back on but the wheels it is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1"}


@pytest.fixture(scope="module")
def place() -> Iterator[Path]:
    """Reachable by the demo's unprivileged processes (pytest's tmp_path is 0700)."""
    path = public_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(place: Path) -> Path:
    """Built from a copy of the source (a build writes build/ and *.egg-info beside it)."""
    source = place / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    out = place / "dist"
    built = run_captured(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = out.glob("*.whl")
    assert len(list(out.glob("*.tar.gz"))) == 1  # and the wheel was built from this sdist
    return found


@pytest.fixture(scope="module")
def venv(place: Path, wheel: Path) -> Path:
    target = place / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(target)], check=True)
    target.chmod(0o755)
    done = run_captured(
        [target / "bin" / "pip", "install", "--no-index", "--disable-pip-version-check",
         "--find-links", dependency_wheels(), str(wheel)],
        env=offline_pip_env(), cwd=place, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def xsk(venv: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed command, run away from the checkout (nothing of it on sys.path)."""
    return run_captured([venv / "bin" / "xsk-broker", *args], cwd=venv, timeout=timeout)


def test_the_wheel_holds_the_packages_and_what_install_units_writes(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.endswith(".dist-info/RECORD")}
    assert tops == {"broker", "client", "lab", "xsk_broker", f"{wheel.name.split('-')[0]}-"
                    f"{PROJECT['version']}.dist-info"}  # fmt: skip
    shipped = sorted(n.removeprefix("broker/") for n in names if n.startswith("broker/shipped/"))
    in_checkout = sorted(
        str(p.relative_to(REPO / "broker")) for p in units.SHIPPED.rglob("*") if p.is_file()
    )
    assert shipped == in_checkout
    assert {"shipped/systemd/xsk-broker.service", "shipped/polkit/org.xsk-broker.policy"} <= set(
        shipped
    )


def test_version_is_the_packages(venv: Path) -> None:
    done = xsk(venv, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"xsk-broker {PROJECT['version']}"
    imported = run_captured(
        [venv / "bin" / "python", "-c", "import broker, xsk_broker; print(broker.__file__)"],
        cwd=venv,
    )
    assert imported.stdout.startswith(str(venv / "lib")), imported.stdout + imported.stderr


def test_doctor_runs_and_reports_each_check(venv: Path, place: Path) -> None:
    done = xsk(venv, "doctor", "--json", "--socket", str(place / "no-broker.sock"))
    assert "Traceback" not in done.stderr, done.stderr
    checks = json.loads(done.stdout)
    by_name = {check["name"]: check for check in checks}
    assert by_name["kernel AF_XDP"]["ok"]
    assert done.returncode == 1  # no broker answers at that socket
    assert not all(check["ok"] for check in checks)


def test_install_units_writes_the_shipped_files_under_a_prefix(venv: Path, place: Path) -> None:
    root = place / "root"
    done = xsk(venv, "install-units", "--prefix", str(root), "--json")
    assert done.returncode == 0, done.stderr
    written = sorted(Path(p).relative_to(root) for p in json.loads(done.stdout)["installed"])
    expected = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert written == expected and len(written) == 8
    service = (root / units.UNIT_DIR / "xsk-broker.service").read_text()
    assert f"ExecStart={venv / 'bin' / 'xsk-broker'} serve" in service
    watcher = (root / units.UNIT_DIR / "xsk-broker-libvirt-watch.service").read_text()
    assert f"ExecStart={venv / 'bin' / 'xsk-broker'} libvirt-watch" in watcher
    socket_unit = root / units.UNIT_DIR / "xsk-broker.socket"
    assert socket_unit.read_bytes() == (REPO / "systemd" / "xsk-broker.socket").read_bytes()


def test_the_installed_demo_moves_frames_through_leased_sockets(venv: Path) -> None:
    done = xsk(venv, "demo", "--queues", "2", "--json", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True
