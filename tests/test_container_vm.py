"""examples/vm@.service and examples/launch-vm.sh under the real systemd, with the real
af-xdp QEMU: the unit's sandbox (DynamicUser=, CAP_IPC_LOCK only, its address families)
and the installed broker give an unprivileged QEMU sockets that carry iPXE's DHCP exchange.

The af-xdp QEMU (a trixie rootfs, lab/qemu.py) is bound read-only into the container
and run through a /usr/bin/qemu-system-x86_64 wrapper, as a packaged QEMU would be found.
dnsmasq (the host's binary) serves DHCP on the veth peer, in the container's network
namespace.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from container import CLIENT_USER, EXEC_PATH, SOURCE_MOUNT, BootedContainer

from lab.brokerproc import public_tempdir, wait_until
from lab.qemu import AfxdpQemu, ensure_qemu
from lab.vm import PEER_IP, dnsmasq

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

QEMU_MOUNT = "/opt/xskt-qemu"
IFNAME, PEER = "xskt-va", "xskt-vb"
BOOT_TIMEOUT = 90.0


def wrapper(qemu: AfxdpQemu) -> str:
    """A qemu-system-x86_64 for the container: the host's argv with the rootfs moved."""
    argv = [arg.replace(str(qemu.rootfs), QEMU_MOUNT) for arg in qemu.argv()]
    return f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n'


@pytest.fixture(scope="module")
def box() -> Iterator[BootedContainer]:
    qemu = ensure_qemu()
    with BootedContainer(binds=[(qemu.rootfs, QEMU_MOUNT)]) as booted:
        script = booted.path("/usr/bin/qemu-system-x86_64")
        script.write_text(wrapper(qemu))
        script.chmod(0o755)
        booted.path("/usr/bin/xsk-broker").symlink_to(EXEC_PATH)
        booted.add_veth(IFNAME, PEER)
        booted.exec(["ip", "addr", "add", f"{PEER_IP}/24", "dev", PEER], check=True)
        booted.add_user()
        yield booted


@pytest.fixture(scope="module")
def dhcp_log(box: BootedContainer) -> Iterator[Path]:
    """dnsmasq on the peer, with full checksums from the peer's stack (see broker/labvm.py)."""
    netns = Path(f"/proc/{box.leader}/ns/net")
    workdir = public_tempdir()
    try:
        with dnsmasq(netns, PEER, workdir) as log:
            box_tool(box, ["ethtool", "-K", PEER, "tx", "off"])
            yield log
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def box_tool(box: BootedContainer, argv: list[str]) -> None:
    """A host tool in the container's network namespace (the rootfs has no ethtool)."""
    subprocess.run(["nsenter", "-t", str(box.leader), "-n", *argv], check=True, timeout=30)


def acks(log: Path) -> int:
    return len(re.findall(rf"DHCPACK\({PEER}\)", log.read_text(errors="replace")))


def unit_log(box: BootedContainer, unit: str) -> str:
    return box.exec(["journalctl", "--no-pager", "-u", unit]).stdout[-3000:]


def lease_tags(box: BootedContainer) -> list[str]:
    status = json.loads(box.exec(["xsk-broker", "status", "--json"], check=True).stdout)
    return [lease["tag"] for lease in status["leases"]]


def test_vm_service_gets_dhcp(box: BootedContainer, dhcp_log: Path) -> None:
    """systemctl start vm@t1: QEMU as a dynamic user with CAP_IPC_LOCK only; its af-xdp NIC
    carries iPXE's DHCP exchange; stopping the unit ends the lease."""
    unit = box.path("/etc/systemd/system/vm@.service")
    unit.write_text((Path(__file__).parent.parent / "examples" / "vm@.service").read_text())
    conf = box.path("/etc/xsk-vm/t1.conf")
    conf.parent.mkdir(exist_ok=True)
    conf.write_text(
        f"IFNAME={IFNAME}\nQUEUES=1\nMEMORY=256\nDISK=null-co://,format=raw\nQEMU_ARGS=-boot n\n"
    )
    box.exec(["systemctl", "daemon-reload"], check=True)
    before = acks(dhcp_log)
    box.exec(["systemctl", "start", "vm@t1"], check=True)
    try:
        acked = wait_until(lambda: acks(dhcp_log) > before, BOOT_TIMEOUT, fail=False)
        assert acked, unit_log(box, "vm@t1")
        shown = box.show("vm@t1", "ActiveState", "MainPID")
        assert shown["ActiveState"] == "active"
        status = box.exec(["cat", f"/proc/{shown['MainPID']}/status"], check=True).stdout
        cap_eff = re.search(r"^CapEff:\s*(\w+)", status, re.MULTILINE)
        assert cap_eff and int(cap_eff.group(1), 16) == 1 << 14  # CAP_IPC_LOCK alone
        assert lease_tags(box) == ["vm-t1"]
    finally:
        box.exec(["systemctl", "stop", "vm@t1"])
    wait_until(lambda: lease_tags(box) == [], 60)


def test_launch_vm_sh_gets_dhcp(box: BootedContainer, dhcp_log: Path) -> None:
    """examples/launch-vm.sh as a member of group xsk-broker with CAP_IPC_LOCK only."""
    before = acks(dhcp_log)
    launch = box.start(
        [f"{SOURCE_MOUNT}/examples/launch-vm.sh", IFNAME, "1", "-boot", "n"],
        CLIENT_USER,
        unit="xskt-launch-vm",
        properties=["AmbientCapabilities=CAP_IPC_LOCK", "Environment=MEMORY=256"],
    )
    try:
        acked = wait_until(lambda: acks(dhcp_log) > before, BOOT_TIMEOUT, fail=False)
        assert acked, unit_log(box, "xskt-launch-vm")
        assert lease_tags(box) == [f"launch-vm-{IFNAME}"]
    finally:
        box.exec(["systemctl", "stop", "xskt-launch-vm"])
        try:
            launch.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            launch.kill()
            launch.communicate()
    wait_until(lambda: lease_tags(box) == [], 60)
