"""`xsk-broker attach-nic --libvirt` and `xsk-broker libvirt-watch` against Debian 12's
real libvirtd (libvirt 9.0) under the container's systemd (tests/libvirt_box.py says why and how).

With the af-xdp QEMU as the domain's <emulator>, running as libvirt-qemu with CAP_IPC_LOCK
alone, the hot-plugged NIC carries the tiny guest's ping, detach-nic takes it out and ends
the lease, and the lease also ends when the domain's QEMU exits. With Debian's own QEMU 7.2
the same command fails in one line naming that QEMU and the missing backend, and leaves no
fd in QEMU and no lease in the broker. A domain that declares a NIC in its <metadata> gets
it from the watcher's unit when it starts, when it restarts, and when it was already
running as the watcher started.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from container import BootedContainer
from libvirt_box import (
    AFXDP_EMULATOR,
    DEBIAN_EMULATOR,
    IFNAME,
    PEER,
    POLICY,
    console,
    domain_xml,
    libvirt_box,
    qmp,
    start_domain,
    virsh,
)
from support import socket_links
from test_qemu_afxdp import GUEST_MAC, HOTPLUG, TRAFFIC

from lab.brokerproc import wait_until
from lab.guest import GuestImage, ensure_guest
from lab.qemu import ensure_qemu
from lab.traffic import iperf_server
from lab.vm import PEER_IP

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

DEVICE = "virtio-net-pci,bus=pci.1"
NETDEV_ID = f"xsk-{IFNAME}"
BOOT_TIMEOUT = 120.0
CAP_IPC_LOCK = 1 << 14
# Once the NIC is up: ping, then iperf3 both ways; then wait for it to go.
HOTPLUG_TRAFFIC = HOTPLUG.replace(f"ping -c 3 -W 5 {PEER_IP} && echo PING-OK\n", TRAFFIC)


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest()


@pytest.fixture(scope="module")
def box(guest: GuestImage) -> Iterator[BootedContainer]:
    with libvirt_box(ensure_qemu(), guest) as booted:
        yield booted


def xsk(box: BootedContainer, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `xsk-broker` as root in the container (root may drive libvirt)."""
    return box.exec(["xsk-broker", *args], timeout=120)


def leases(box: BootedContainer) -> list[dict[str, Any]]:
    done = xsk(box, "status", "--json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["leases"])


def wait_console(
    box: BootedContainer, name: str, pattern: str, timeout: float
) -> re.Match[str] | None:
    path = box.path(console(name))

    def seen() -> bool:
        return (
            path.exists() and re.search(pattern, path.read_text(errors="replace"), re.M) is not None
        )

    if not wait_until(seen, timeout, fail=False):
        text = path.read_text(errors="replace") if path.exists() else "(no console)"
        log = box.path(f"/var/log/libvirt/qemu/{name}.log").read_text(errors="replace")
        raise AssertionError(f"no /{pattern}/ in {timeout} s\n{text[-2000:]}\n{log[-2000:]}")
    return re.search(pattern, path.read_text(errors="replace"), re.M)


def bits_per_second(box: BootedContainer, name: str, label: str) -> float:
    found = wait_console(box, name, rf"^{label} \"bits_per_second\":\s*([0-9.e+]+)", 60)
    assert found is not None
    return float(found.group(1))


@contextlib.contextmanager
def peer_iperf_server(box: BootedContainer) -> Iterator[None]:
    """iperf3 on the peer (the host's binary in the container's network namespace), whose
    stack sends full checksums (a guest drops partially-checksummed frames)."""
    netns = ["nsenter", "-t", str(box.leader), "-n"]
    subprocess.run([*netns, "ethtool", "-K", PEER, "tx", "off"], check=True, capture_output=True)
    with iperf_server(netns, PEER_IP):
        yield


def proc_status(box: BootedContainer, pid: int) -> dict[str, str]:
    text = box.path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def socket_fds(box: BootedContainer, pid: int) -> int:
    return len(socket_links(box.path(f"/proc/{pid}/fd")))


def attach(
    box: BootedContainer, name: str, device: str = DEVICE
) -> subprocess.CompletedProcess[str]:
    return xsk(
        box, "attach-nic", "--libvirt", name, "--ifname", IFNAME, "--queues", "1",
        "--mac", GUEST_MAC, "--device", device, "--json",
    )  # fmt: skip


def assert_nothing_left(box: BootedContainer, name: str, pid: int, sockets: int) -> None:
    """No fd name registered in QEMU, no netdev, no socket more than before, no lease."""
    fd_name = f"xsk-{NETDEV_ID}-q0"
    closefd = qmp(box, name, "closefd", fdname=fd_name)
    assert closefd["error"]["desc"] == f"File descriptor named '{fd_name}' not found"
    assert NETDEV_ID not in virsh(box, "qemu-monitor-command", name, "--hmp", "info network")
    assert socket_fds(box, pid) == sockets
    assert leases(box) == []


def test_hotplug_into_libvirt_domain_carries_traffic(
    box: BootedContainer, guest: GuestImage
) -> None:
    name = "xskt-afxdp"
    xml = domain_xml(name, AFXDP_EMULATOR, guest, guest.cmdline(HOTPLUG_TRAFFIC))
    with peer_iperf_server(box):
        pid = start_domain(box, name, xml)
        try:
            attached_and_detached(box, name, pid)
        finally:
            virsh(box, "destroy", name, check=False)
    wait_until(lambda: leases(box) == [], 60)


def attached_and_detached(box: BootedContainer, name: str, pid: int) -> None:
    """The NIC carries ping and TCP both ways; detach ends the lease; a new one ends with QEMU."""
    status = proc_status(box, pid)
    assert status["Uid"].split()[0] != "0"  # libvirt-qemu
    assert int(status["CapEff"], 16) == CAP_IPC_LOCK
    wait_console(box, name, "^XSKT-BOOTED", BOOT_TIMEOUT)
    attached = attach(box, name)
    assert attached.returncode == 0, attached.stderr
    report = json.loads(attached.stdout)
    (lease,) = leases(box)
    assert (lease["lease_id"], lease["consumer_pid"]) == (report["lease_id"], pid)
    assert "af-xdp" in virsh(box, "qemu-monitor-command", name, "--hmp", "info network")
    wait_console(box, name, "^PING-OK", 60)
    up, down = (bits_per_second(box, name, label) for label in ("UP-BPS", "DOWN-BPS"))
    print(
        f"\nlibvirt domain, af-xdp NIC: TCP guest->peer {up / 1e6:.0f} Mbit/s, "
        f"peer->guest {down / 1e6:.0f} Mbit/s (TCG)"
    )
    assert up > 1e6 and down > 1e6

    detached = xsk(box, "detach-nic", "--libvirt", name, "--ifname", IFNAME, "--json")
    assert detached.returncode == 0, detached.stderr
    result = json.loads(detached.stdout)
    assert result["device_released"] and result["netdev_removed"]
    assert result["leases_released"] == [lease["lease_id"]]
    wait_console(box, name, "^NIC-GONE", 30)
    assert NETDEV_ID not in virsh(box, "qemu-monitor-command", name, "--hmp", "info network")
    assert leases(box) == []

    again = attach(box, name)  # the lease ends with QEMU, too
    assert again.returncode == 0, again.stderr
    assert [x["consumer_pid"] for x in leases(box)] == [pid]


@pytest.mark.parametrize(
    ("emulator", "device", "error"),
    [
        (
            DEBIAN_EMULATOR,
            DEVICE,
            r"QMP_ERROR: Parameter 'type' does not accept value 'af-xdp' "
            r"\(QEMU 7\.2\.\d+ has no af-xdp netdev backend: .*\)\n",
        ),
        (AFXDP_EMULATOR, "virtio-net-pci,bus=xskt-nope", r"QMP_ERROR: Bus 'xskt-nope' not found\n"),
    ],
    ids=["debian-qemu-7.2", "device_add-fails"],
)
def test_failure_is_one_line_and_leaves_nothing_behind(
    box: BootedContainer, guest: GuestImage, emulator: str, device: str, error: str
) -> None:
    """Debian's QEMU refuses netdev_add (no af-xdp backend); the af-xdp QEMU takes the
    netdev but not the device. Either way every getfd name, the netdev and the lease go."""
    name = "xskt-failing"
    pid = start_domain(box, name, domain_xml(name, emulator, guest, guest.cmdline(None)))
    try:
        sockets = socket_fds(box, pid)
        failed = attach(box, name, device)
        assert failed.returncode == 1
        assert re.fullmatch(error, failed.stderr), failed.stderr
        assert_nothing_left(box, name, pid, sockets)
    finally:
        virsh(box, "destroy", name, check=False)
        virsh(box, "undefine", name, check=False)


def set_policy(box: BootedContainer, policy: str) -> None:
    """The broker's policy file; the next request starts the broker with it."""
    box.path("/etc/xsk-broker/policy.toml").write_text(policy)
    box.exec(["systemctl", "stop", "xsk-broker.service"], check=True)


def test_naming_qemu_as_consumer_needs_other_consumers(
    box: BootedContainer, guest: GuestImage
) -> None:
    """The VM-manager case is the policy's to allow: without other_consumers root may not
    name libvirt-qemu's QEMU, and then no fd ever reaches QEMU."""
    name = "xskt-denied"
    pid = start_domain(box, name, domain_xml(name, AFXDP_EMULATOR, guest, guest.cmdline(None)))
    set_policy(box, POLICY.replace("other_consumers = true\n", ""))
    try:
        sockets = socket_fds(box, pid)
        denied = attach(box, name)
        assert denied.returncode == 1
        assert re.fullmatch(r"DENIED: [^\n]*other_consumers[^\n]*\n", denied.stderr), denied.stderr
        assert_nothing_left(box, name, pid, sockets)
    finally:
        set_policy(box, POLICY)
        virsh(box, "destroy", name, check=False)


def test_domain_not_running_or_unknown_is_one_clear_line(
    box: BootedContainer, guest: GuestImage
) -> None:
    name = "xskt-stopped"
    box.path(f"/tmp/{name}.xml").write_text(
        domain_xml(name, AFXDP_EMULATOR, guest, guest.cmdline(None))
    )
    virsh(box, "define", f"/tmp/{name}.xml")
    stopped = attach(box, name)
    assert (stopped.returncode, stopped.stderr) == (
        1,
        f"LIBVIRT_ERROR: domain {name} is not running: start it first (virsh start {name})\n",
    )
    unknown = attach(box, "xskt-no-such-domain")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("LIBVIRT_ERROR: Domain not found")
    assert unknown.stderr.count("\n") == 1
    assert leases(box) == []


WATCHER = "xsk-broker-libvirt-watch.service"
DECLARED = (
    f'<xsk:nic xmlns:xsk="urn:xsk-broker:libvirt:1" ifname="{IFNAME}" queues="1" '
    f'mac="{GUEST_MAC}" device="{DEVICE}"/>'
)


def watcher_log(box: BootedContainer) -> str:
    return box.exec(["journalctl", "--no-pager", "-u", WATCHER]).stdout


def wait_leased_to(box: BootedContainer, pid: int, timeout: float) -> None:
    """Until the one lease is QEMU pid's; the watcher's journal if it never is."""
    if not wait_until(lambda: [x["consumer_pid"] for x in leases(box)] == [pid], timeout, False):
        raise AssertionError(f"no lease for pid {pid}: {leases(box)}\n{watcher_log(box)[-3000:]}")


def test_watcher_gives_declared_nics(box: BootedContainer, guest: GuestImage) -> None:
    name = "xskt-declared"
    xml = domain_xml(name, AFXDP_EMULATOR, guest, guest.cmdline(HOTPLUG), DECLARED)
    try:
        # Started while the watcher is down: the watcher's reconcile at start attaches it.
        first = start_domain(box, name, xml)
        wait_console(box, name, "^XSKT-BOOTED", BOOT_TIMEOUT)
        assert leases(box) == []
        box.exec(["systemctl", "start", WATCHER], check=True)
        wait_leased_to(box, first, 90)
        assert [x["tag"] for x in leases(box)] == [NETDEV_ID]
        wait_console(box, name, "^PING-OK", 60)

        # Restarted: the lease ended with the old QEMU, the start event brings a new one.
        virsh(box, "destroy", name)
        wait_until(lambda: leases(box) == [], 60)
        virsh(box, "start", name)
        second = int(box.path(f"/run/libvirt/qemu/{name}.pid").read_text())
        wait_leased_to(box, second, 120)
        wait_console(box, name, "^PING-OK", BOOT_TIMEOUT)

        # libvirtd restarted (the domain runs on): the watcher exits, systemd starts it
        # again, and its reconcile finds the NIC's lease in place.
        box.exec(["systemctl", "restart", "libvirtd"], check=True)
        wait_until(lambda: watcher_log(box).count("watching libvirt domain events") == 2, 90)
        assert box.show(WATCHER, "NRestarts", "ActiveState") == {
            "NRestarts": "1",
            "ActiveState": "active",
        }
        assert "libvirt closed the connection" in watcher_log(box)
        assert [x["consumer_pid"] for x in leases(box)] == [second]
    finally:
        box.exec(["systemctl", "stop", WATCHER])
        virsh(box, "destroy", name, check=False)
    journal = watcher_log(box)
    assert journal.count(f"{name}: attached {NETDEV_ID}") == 2, journal
    wait_until(lambda: leases(box) == [], 60)
