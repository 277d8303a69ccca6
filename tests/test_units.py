"""The shipped units as installed: clean `systemd-analyze verify`, security exposure <= 1.7."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from broker import units

# What both units measure now. xsk-broker.service at 1.5 would need ProtectProc= (hides
# the consumers' /proc/PID that the broker reads: identity, start time, RLIMIT_MEMLOCK) or
# PrivateUsers=/PrivateNetwork= (its capabilities would no longer reach the host's
# interfaces).
MAX_EXPOSURE = 1.7


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """install_units() into a staging root, ExecStart pointing at an existing executable."""
    root = tmp_path_factory.mktemp("root")
    stub = root / "xsk-broker"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units.install_units(root, str(stub))
    return root / units.UNIT_DIR


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_install_puts_every_file_in_its_vendor_directory(tmp_path: Path) -> None:
    written = units.install_units(tmp_path, "/opt/xsk-broker/bin/xsk-broker")
    relative = {path.relative_to(tmp_path) for path in written}
    assert {
        units.UNIT_DIR / "xsk-broker.socket",
        units.UNIT_DIR / "xsk-broker.service",
        units.UNIT_DIR / "xsk-broker-libvirt-watch.service",
        units.SYSUSERS[1],
        units.TMPFILES[1],
    } <= relative
    service = (tmp_path / units.UNIT_DIR / "xsk-broker.service").read_text()
    assert "\nExecStart=/opt/xsk-broker/bin/xsk-broker serve --idle-exit 600\n" in service
    watcher = (tmp_path / units.UNIT_DIR / "xsk-broker-libvirt-watch.service").read_text()
    assert "\nExecStart=/opt/xsk-broker/bin/xsk-broker libvirt-watch\n" in watcher
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in written)


@pytest.mark.parametrize("bad", ["xsk-broker", "/opt/my broker/xsk-broker", "/opt/%n"])
def test_exec_path_that_systemd_would_misread_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="exec_path"):
        units.service_text(bad)


def test_verify_is_clean(installed: Path) -> None:
    done = analyze("verify", *(str(installed / name) for name in (*units.UNITS, *units.SERVICES)))
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


@pytest.mark.parametrize("service", units.SERVICES)
def test_security_exposure_stays_at_its_measured_figure(installed: Path, service: str) -> None:
    done = analyze("security", "--offline=true", str(installed / service))
    match = re.search(rf"Overall exposure level for {re.escape(service)}: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure of {service}: {exposure}")
    assert exposure <= MAX_EXPOSURE, done.stdout
