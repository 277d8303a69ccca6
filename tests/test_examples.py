"""Each recipe in examples/ run against the real broker, with examples/fake-qemu as QEMU.

Debian's QEMU lacks af-xdp, so fake-qemu checks the argv and inherited fds exactly as
af-xdp would need them; for vm_manager.py it then execs the real QEMU (minus the af-xdp
NIC) so that the hot-plug goes over real QMP.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from client.sync import Client
from lab.brokerproc import REPO, BrokerEnv

pytestmark = pytest.mark.kernel  # every recipe asks the session's broker
EXAMPLES = REPO / "examples"
FAKE_QEMU = EXAMPLES / "fake-qemu"
NO_AFXDP = "Parameter 'type' does not accept value 'af-xdp'"


@pytest.fixture
def env(tmp_path: Path, broker: BrokerEnv) -> dict[str, str]:
    """An environment with `xsk-broker` on PATH and the test broker as the default socket."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "xsk-broker"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m xsk_broker "$@"\n')
    wrapper.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "XSK_BROKER_SOCKET": broker.socket_path,
        "FAKE_QEMU_REPORT": str(tmp_path / "report.json"),
    }


def report(env: dict[str, str]) -> dict[str, Any]:
    written: dict[str, Any] = json.loads(Path(env["FAKE_QEMU_REPORT"]).read_text())
    return written


def assert_lease_ends(broker: BrokerEnv, tag: str) -> None:
    """The consumer has exited, so the broker ends its lease (pidfd readable)."""
    client = Client(broker.socket_path)
    ended = wait_until(lambda: all(x.tag != tag for x in client.status().leases), fail=False)
    assert ended, f"lease {tag} outlived its consumer"


def test_launch_vm_sh(env: dict[str, str], broker: BrokerEnv) -> None:
    run = subprocess.run(
        [EXAMPLES / "launch-vm.sh", broker.ifname, "2", "-drive", "file=vm.qcow2,if=virtio"],
        env={**env, "QEMU": str(FAKE_QEMU)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    found = report(env)
    (netdev,) = found["netdevs"]
    assert netdev["problems"] == []
    assert netdev["options"]["ifname"] == broker.ifname
    assert (netdev["options"]["queues"], netdev["options"]["start-queue"]) == ("2", "0")
    assert "virtio-net-pci,netdev=net0,mq=on,vectors=6" in found["argv"]
    assert found["argv"][-2:] == ["-drive", "file=vm.qcow2,if=virtio"]
    assert_lease_ends(broker, f"launch-vm-{broker.ifname}")


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def exec_start(settings: dict[str, list[str]], instance: str, conf: dict[str, str]) -> list[str]:
    """ExecStart as systemd expands it: %i, then ${VAR} from Environment= and the conf."""
    variables = dict(v.split("=", 1) for e in settings["Environment"] for v in e.split())
    variables.update(conf)
    words = shlex.split(settings["ExecStart"][0].replace("%i", instance))
    expanded = []
    for word in words:
        if re.fullmatch(r"\$\w+", word):  # $VAR alone: split at white space
            expanded += variables[word[1:]].split()
        else:
            expanded.append(re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], word))
    return expanded


def test_vm_service_unit(env: dict[str, str], broker: BrokerEnv, tmp_path: Path) -> None:
    unit = EXAMPLES / "vm@.service"
    settings = unit_settings(unit)
    assert settings["SupplementaryGroups"] == ["xsk-broker"]
    assert settings["DynamicUser"] == ["yes"]
    # QEMU locks its UMEM with CAP_IPC_LOCK and holds no other capability
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == ["CAP_IPC_LOCK"]
    assert "LimitMEMLOCK" not in settings

    # systemd's own parser: any unknown key or bad value is a warning on stderr.
    units = tmp_path / "units"
    units.mkdir()
    text = unit.read_text().replace("/usr/bin/xsk-broker", "/bin/true")
    (units / "vm@t1.service").write_text(text.replace("/usr/bin/qemu-system-x86_64", "/bin/true"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(units / "vm@t1.service")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (verify.returncode, verify.stderr) == (0, "")

    conf = {"IFNAME": broker.ifname, "QUEUES": "3", "START_QUEUE": "10", "DISK": "t1.qcow2"}
    argv = exec_start(settings, "t1", conf)
    assert argv[0] == "/usr/bin/xsk-broker" and "/usr/bin/qemu-system-x86_64" in argv
    installed = shutil.which("xsk-broker", path=env["PATH"])
    assert installed is not None
    argv[0] = installed
    argv[argv.index("/usr/bin/qemu-system-x86_64")] = str(FAKE_QEMU)
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    (netdev,) = report(env)["netdevs"]
    assert netdev["problems"] == []
    assert (netdev["options"]["queues"], netdev["options"]["start-queue"]) == ("3", "10")
    assert_lease_ends(broker, "vm-t1")


def test_vm_manager_py(env: dict[str, str], broker: BrokerEnv) -> None:
    """First NIC inherited (checked by fake-qemu), second hot-plugged over real QMP."""
    run = subprocess.run(
        [sys.executable, EXAMPLES / "vm_manager.py", broker.ifname, "--qemu", str(FAKE_QEMU), "-S"],
        env={**env, "FAKE_QEMU_EXEC": "qemu-system-x86_64"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = report(env)
    (netdev,) = found["netdevs"]
    assert netdev["problems"] == []
    assert (netdev["options"]["id"], netdev["options"]["start-queue"]) == ("net0", "0")
    assert "-qmp" in found["rest"] and "-netdev" not in found["rest"]
    # This QEMU has no af-xdp, so the hot-plug reaches netdev_add and is rolled back.
    assert run.returncode == 1, run.stderr
    assert f"hot-plug of net1 failed: QMP_ERROR: {NO_AFXDP}" in run.stderr
    assert_lease_ends(broker, "net1")
    assert_lease_ends(broker, "vm-net0")
