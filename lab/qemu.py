"""A QEMU with the af-xdp netdev backend, for tests that boot guests on handed-out sockets.

No Debian QEMU has af-xdp, and the backend needs libxdp >= 1.4, which only trixie has (with
trixie's libc). scripts/qemu-afxdp.sh builds trixie's own qemu source package inside a
debootstrapped trixie rootfs; that takes about 8 minutes on two cores, so the result
is cached outside the repo, keyed by a hash of the script, and built once (lab.cache).

The QEMU runs from the host's filesystem view through the rootfs's own dynamic loader, not
in a chroot: an unprivileged uid in any network namespace can start it, with no mounts and
no privilege, and host paths (sockets, images) and inherited fd numbers mean what they say.
Through ld.so, /proc/self/exe is the loader, so QEMU cannot find its data directory itself;
argv() names the firmware directories with -L.

    qemu = ensure_qemu()
    subprocess.run([*qemu.argv(), "-M", "none", "-nographic", "-netdev", "help"])
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab import cache as labcache

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "qemu-afxdp.sh"
BUILD_TIMEOUT = 30 * 60

# Inside the rootfs (relative paths).
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib")
BINARY = "opt/qemu/bin/qemu-system-x86_64"
# QEMU's own data (keymaps), Debian's qemu-system-data and ipxe-qemu (option ROMs such as
# pvh.bin, efi-virtio.rom), seabios (bios-256k.bin, vgabios-*.bin); searched in this order.
FIRMWARE_DIRS = ("opt/qemu/share/qemu", "usr/share/qemu", "usr/share/seabios")
# libxdp's BPF objects (xsk_def_xdp_prog.o, used when QEMU loads its own program).
BPF_OBJECTS = "usr/lib/x86_64-linux-gnu/bpf"
# What the tests' guests need: BIOS, PXE on virtio-net-pci, -kernel (PVH and bzImage).
FIRMWARE = ("bios-256k.bin", "efi-virtio.rom", "pvh.bin", "linuxboot_dma.bin")


@dataclass(frozen=True)
class AfxdpQemu:
    """A cached build: rootfs is the cache entry, version what `--version` says."""

    rootfs: Path
    version: str

    @property
    def loader(self) -> Path:
        return self.rootfs / LOADER

    @property
    def binary(self) -> Path:
        return self.rootfs / BINARY

    @property
    def library_path(self) -> str:
        return ":".join(str(self.rootfs / d) for d in LIBRARY_DIRS)

    @property
    def firmware_dirs(self) -> list[Path]:
        return [self.rootfs / d for d in FIRMWARE_DIRS]

    def argv(self) -> list[str]:
        """The command prefix running this QEMU (append QEMU options): the rootfs's ld.so,
        its library directories, the binary, and -L for each firmware directory."""
        argv = [str(self.loader), "--library-path", self.library_path, str(self.binary)]
        for directory in self.firmware_dirs:
            argv += ["-L", str(directory)]
        return argv

    def env(self) -> dict[str, str]:
        """Environment to add when QEMU attaches its own program (no inhibit=on): libxdp
        looks for its BPF objects at a compiled-in path, which from the host's view would
        be the host's; point it at the rootfs's."""
        return {"LIBXDP_OBJECT_PATH": str(self.rootfs / BPF_OBJECTS)}

    def find_firmware(self, name: str) -> Path | None:
        """Where QEMU will find the file name (the first -L directory holding it)."""
        for directory in self.firmware_dirs:
            if (directory / name).is_file():
                return directory / name
        return None


def ensure_qemu() -> AfxdpQemu:
    """The cached QEMU, built first if missing (8 minutes or so on two cores)."""
    path = labcache.entry("qemu-afxdp", SCRIPT.read_bytes(), labcache.BUILD_WORK.read_bytes())
    return _load(labcache.ensure(path, lambda dest: ["sh", str(SCRIPT), str(dest)], BUILD_TIMEOUT))


@functools.cache
def _load(path: Path) -> AfxdpQemu:
    """The entry at path, with its version; fails loudly if firmware is missing."""
    qemu = AfxdpQemu(rootfs=path, version="")
    missing = [name for name in FIRMWARE if qemu.find_firmware(name) is None]
    if missing:
        raise RuntimeError(f"{path}: no {', '.join(missing)} in {qemu.firmware_dirs}")
    done = subprocess.run(
        [*qemu.argv(), "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    match = re.search(r"QEMU emulator version (\S+)", done.stdout)
    if match is None:
        raise RuntimeError(f"{path}: unexpected --version output {done.stdout!r}")
    return AfxdpQemu(rootfs=path, version=match.group(1))
