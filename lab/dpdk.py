"""DPDK 24.11 (trixie) with the af_xdp PMD, for tests and the bench that run dpdk-testpmd.

scripts/dpdk-rootfs.sh installs trixie's dpdk packages into a debootstrapped trixie rootfs,
cached outside the repo and keyed by the script (lab.cache). testpmd runs from the host's
view through the rootfs's own ld.so, like the af-xdp QEMU (lab/qemu.py): any uid in any
network namespace can start it, and host paths (device-plugin sockets, bpffs pins) mean what
they say. DPDK finds its PMD plugins at a compiled-in path, which from the host's view is
the host's, so argv() names the two it needs with -d.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab import cache as labcache

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "dpdk-rootfs.sh"
BUILD_TIMEOUT = 20 * 60
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu",)
TESTPMD = "usr/bin/dpdk-testpmd"
PLUGINS = ("librte_net_af_xdp.so.25", "librte_mempool_ring.so.25")


@dataclass(frozen=True)
class Dpdk:
    """A cached rootfs holding dpdk-testpmd."""

    rootfs: Path

    def testpmd(self) -> list[str]:
        """The command prefix running dpdk-testpmd (append EAL options, --, app options)."""
        libs = self.rootfs / LIBRARY_DIRS[0]
        argv = [str(self.rootfs / LOADER), "--library-path", str(libs), str(self.rootfs / TESTPMD)]
        for plugin in PLUGINS:
            argv += ["-d", str(libs / plugin)]
        return argv


def ensure_dpdk() -> Dpdk:
    """The cached rootfs, built first if missing (a debootstrap: a few minutes)."""
    path = labcache.entry("dpdk", SCRIPT.read_bytes())
    return Dpdk(labcache.ensure(path, lambda dest: ["sh", str(SCRIPT), str(dest)], BUILD_TIMEOUT))
