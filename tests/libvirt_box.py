"""A booted container running Debian 12's libvirtd, for the libvirt tests.

The rootfs is the base container rootfs plus libvirt-daemon-system (libvirt 9.0), Debian's
QEMU 7.2 and libvirt's Python binding (scripts/libvirt-rootfs.sh), cached under a hash of
its inputs. libvirtd runs under the container's systemd as Debian starts it (libvirtd.socket),
next to the installed broker units.

The af-xdp QEMU (a trixie rootfs, lab/qemu.py) is bound read-only and run by a wrapper that
libvirt takes for the emulator binary (it probes it over QMP like any other). libvirt runs
QEMU as libvirt-qemu with no capability, but QEMU registers 32 MiB of UMEM per queue and the
hard RLIMIT_MEMLOCK here is 8 MiB (no CAP_SYS_RESOURCE to raise it), so the wrapper goes
through a copy of setpriv that holds CAP_IPC_LOCK as a file capability and passes it on as
an ambient capability: QEMU ends up as libvirt-qemu with CAP_IPC_LOCK alone.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from container import REPO, BootedContainer, ensure_rootfs

from lab import cache as labcache
from lab.guest import GuestImage
from lab.qemu import AfxdpQemu
from lab.vm import PEER_IP

SCRIPT = REPO / "scripts" / "libvirt-rootfs.sh"
REQUIREMENTS = ["libvirt-python>=9.0"]
QEMU_MOUNT = "/opt/xskt-qemu"
GUEST_MOUNT = "/opt/xskt-guest"
IMAGES = "/var/lib/libvirt/images/xskt"
AFXDP_EMULATOR = "/usr/local/bin/qemu-afxdp"
DEBIAN_EMULATOR = "/usr/local/bin/qemu-debian"
SETPRIV = "/usr/local/libexec/xskt-setpriv"
IFNAME, PEER = "xskt-lva", "xskt-lvb"
# Whoever may open the socket asks for themselves; root may also name another uid's process
# as the consumer (the VM-manager case: libvirt's QEMU runs as libvirt-qemu).
POLICY = """
[[allow]]
name = "root-for-vms"
users = [0]
admin = true
other_consumers = true
"""


def ensure_libvirt_rootfs() -> Path:
    """The cached libvirt rootfs, built first from the base rootfs if missing (about a
    minute: apt inside, libvirt-python compiled on the host)."""
    base = ensure_rootfs()
    path = labcache.entry(
        "libvirt-rootfs", SCRIPT.read_bytes(), base.name.encode(), "\n".join(REQUIREMENTS).encode()
    )
    return labcache.ensure(
        path,
        lambda dest: ["sh", str(SCRIPT), str(dest), str(base), sys.executable, *REQUIREMENTS],
        1800,
    )


def wrapper(argv: list[str]) -> str:
    """An emulator path running argv with CAP_IPC_LOCK (through the file-capable setpriv)."""
    caps = ["--inh-caps=+ipc_lock", "--ambient-caps=+ipc_lock", "--"]
    return f'#!/bin/sh\nexec {SETPRIV} {shlex.join([*caps, *argv])} "$@"\n'


@contextlib.contextmanager
def libvirt_box(qemu: AfxdpQemu, guest: GuestImage, queues: int = 1) -> Iterator[BootedContainer]:
    """The booted container: libvirtd up with both emulators, the broker allowing root to
    name QEMU as consumer, veth IFNAME/PEER (PEER at PEER_IP/24)."""
    binds = [(qemu.rootfs, QEMU_MOUNT), (guest.kernel.parent, GUEST_MOUNT)]
    with BootedContainer(rootfs=ensure_libvirt_rootfs(), binds=binds) as box:
        box.path(SETPRIV).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(box.path("/usr/bin/setpriv"), box.path(SETPRIV))
        box.exec(["setcap", "cap_ipc_lock+p", SETPRIV], check=True)
        afxdp = [arg.replace(str(qemu.rootfs), QEMU_MOUNT) for arg in qemu.argv()]
        # Debian's QEMU gets CAP_IPC_LOCK too, so that only its missing backend fails.
        for path, argv in (
            (AFXDP_EMULATOR, afxdp),
            (DEBIAN_EMULATOR, ["/usr/bin/qemu-system-x86_64"]),
        ):
            emulator = box.path(path)
            emulator.write_text(wrapper(argv))
            emulator.chmod(0o755)
        # libvirt's cgroup v1 setup fails on the container's read-only controllers.
        with box.path("/etc/libvirt/qemu.conf").open("a") as conf:
            conf.write("cgroup_controllers = [ ]\n")
        box.path("/etc/xsk-broker/policy.toml").write_text(POLICY)
        box.path("/usr/bin/xsk-broker").symlink_to("/opt/xsk-broker/bin/xsk-broker")
        images = box.path(IMAGES)
        images.mkdir(parents=True)
        for name in (guest.kernel.name, guest.initrd.name):
            shutil.copy(guest.kernel.parent / name, images / name)
        # The next request starts the broker again, with this policy.
        box.exec(["systemctl", "stop", "xsk-broker.service"], check=True)
        box.exec(["systemctl", "restart", "libvirtd"], check=True)
        box.add_veth(IFNAME, PEER, queues)
        box.exec(["ip", "addr", "add", f"{PEER_IP}/24", "dev", PEER], check=True)
        yield box


def domain_xml(
    name: str, emulator: str, guest: GuestImage, cmdline: str, metadata: str = ""
) -> str:
    """A q35 domain booting the tiny guest's kernel, console to a file, one free PCIe root
    port (pci.1) for the hot-plugged NIC, and no other device; metadata goes in <metadata>."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <metadata>{metadata}</metadata>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{IMAGES}/{guest.kernel.name}</kernel>
    <initrd>{IMAGES}/{guest.initrd.name}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='pci' model='pcie-root-port' index='1'/>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='file'><source path='{console(name)}'/><target port='0'/></serial>
  </devices>
</domain>
"""


def console(name: str) -> str:
    return f"/var/log/libvirt/qemu/{name}.console"


def virsh(box: BootedContainer, *args: str, check: bool = True) -> str:
    done = box.exec(["virsh", "--quiet", *args], timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr}")
    return done.stdout


def start_domain(box: BootedContainer, name: str, xml: str) -> int:
    """Define and start; QEMU's pid (libvirt's pid file)."""
    path = box.path(f"/tmp/{name}.xml")
    path.write_text(xml)
    virsh(box, "define", f"/tmp/{name}.xml")
    virsh(box, "start", name)
    return int(box.path(f"/run/libvirt/qemu/{name}.pid").read_text())


def qmp(box: BootedContainer, name: str, command: str, **args: Any) -> dict[str, Any]:
    """A QMP command through libvirt; QEMU's whole reply (return or error)."""
    body = {"execute": command, **({"arguments": args} if args else {})}
    return dict(json.loads(virsh(box, "qemu-monitor-command", name, json.dumps(body))))
