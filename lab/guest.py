"""A tiny Linux guest for tests and benchmarks that boot a VM under QEMU (TCG, no KVM here).

scripts/guest-image.sh builds it once into the lab cache (lab.cache):
Debian bookworm's kernel as an uncompressed ELF `vmlinux` (QEMU boots it through its PVH
entry note, no bootloader in the way) and an uncompressed initramfs with
busybox-static, iperf3 (plus its libraries and loader), the virtio-net-over-PCI modules and an
/init. Everything in the cache is world-readable, so QEMU may run as an unprivileged user.

    guest = ensure_guest()
    argv = [QEMU, *guest.qemu_args("iperf3 -c 10.0.2.2 -t 2", ip="10.0.2.15/24"),
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]

The /init contract:
  - Mounts proc, sysfs, devtmpfs (and devpts); stdio is /dev/console, which is ttyS0
    (`console=ttyS0` on the command line). Busybox applets are on PATH; iperf3 is
    /usr/bin/iperf3. The root is the initramfs itself (writable, in RAM); cwd is /tmp.
  - Loads virtio_ring, virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio, virtio_pci,
    failover, net_failover, virtio_net (dependency order), brings up lo.
  - Kernel parameters it reads from /proc/cmdline:
      xskt.ip=ADDR/PREFIX   set on eth0 (the first virtio-net NIC) and bring it up; without
                            it eth0 stays down. No default route: add one in the script.
      xskt.ip1=ADDR/PREFIX  the same for eth1 (the second NIC), optional.
      xskt.sh=BASE64        a shell script, run with busybox sh in /tmp.
    A parameter given twice counts once, the first time (extra_cmdline comes before xskt.sh).
  - Prints `XSKT-BOOTED` once the modules are loaded and the addresses set.
  - With xskt.sh: runs it, prints `XSKT-EXIT <status>`, kills what the script left running
    (so the console drains) and powers off (`poweroff -f`); with -no-reboot QEMU then exits
    (status 0).
  - Without xskt.sh: prints `XSKT-READY` and runs an interactive shell on the console (drive it
    through the serial port, e.g. `serial="unix:PATH,server=on,wait=off"`); when that shell
    exits, `XSKT-EXIT <status>` and power-off as above.
  - qemu_args() boots with `quiet panic=-1 mitigations=off rodata=off`: if /init dies the
    guest reboots, which with -no-reboot ends QEMU without an XSKT-EXIT line.
The whole kernel command line must fit in 2047 bytes (x86 COMMAND_LINE_SIZE), so the base64
script is limited to about 1.4 kB; qemu_args() raises ValueError past that.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from lab import cache as labcache

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "guest-image.sh"
COMMAND_LINE_MAX = 2047
# console=ttyS0: the serial port is the console; quiet: kernel messages at warning level and
# worse only; panic=-1: a dying /init reboots, which -no-reboot turns into QEMU exiting;
# mitigations=off rodata=off: about 0.7 s less boot under TCG, nothing to protect in here.
BASE_CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off rodata=off"


def ensure_guest() -> GuestImage:
    """The cached guest, built first if missing (about 30 s and 75 MB of downloads)."""
    path = labcache.entry("guest", SCRIPT.read_bytes())
    labcache.ensure(path, lambda dest: ["bash", str(SCRIPT), str(dest)], timeout=900)
    return GuestImage(kernel=path / "vmlinux", initrd=path / "initrd.cpio")


def encode_script(script: str) -> str:
    """The value of xskt.sh for a script."""
    return base64.b64encode(script.encode()).decode("ascii")


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path

    def cmdline(
        self,
        script: str | None,
        ip: str | None = None,
        ip1: str | None = None,
        extra_cmdline: str = "",
    ) -> str:
        """The kernel command line for the /init contract (see the module docstring)."""
        words = [BASE_CMDLINE]
        for name, value in (("xskt.ip", ip), ("xskt.ip1", ip1)):
            if value is not None:
                ipaddress.ip_interface(value)  # ValueError on anything else
                if "/" not in value:
                    raise ValueError(f"{name} needs ADDR/PREFIX, got {value!r}")
                words.append(f"{name}={value}")
        if extra_cmdline:
            words.append(extra_cmdline)
        if script is not None:
            words.append(f"xskt.sh={encode_script(script)}")
        line = " ".join(words)
        if len(line) > COMMAND_LINE_MAX:
            raise ValueError(f"kernel command line of {len(line)} bytes (max {COMMAND_LINE_MAX})")
        return line

    def qemu_args(
        self,
        script: str | None,
        ip: str | None = None,
        ip1: str | None = None,
        extra_cmdline: str = "",
        *,
        memory_mb: int = 256,
        cpus: int = 1,
        serial: str = "stdio",
    ) -> list[str]:
        """QEMU arguments (no binary, no NICs) booting the guest under TCG.

        script=None boots to XSKT-READY and a shell on the serial console. The console goes
        to QEMU's stdout unless serial says otherwise; -nodefaults means no other devices,
        so add `-netdev ... -device virtio-net-pci,netdev=...` (first one is eth0). For
        hot-plug on q35, add `-device pcie-root-port,id=rp1,chassis=1` and device_add the NIC
        with bus=rp1.
        """
        return [
            "-machine",
            "q35,accel=tcg",
            "-smp",
            str(cpus),
            "-m",
            str(memory_mb),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            serial,
            "-no-reboot",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            self.cmdline(script, ip, ip1, extra_cmdline),
        ]
