"""DPDK 24.11 (trixie) with the af_xdp PMD, for tests and the bench that run dpdk-testpmd.

scripts/dpdk-rootfs.sh installs trixie's dpdk packages into a debootstrapped trixie rootfs,
cached outside the repo and keyed by the script (lab.cache). testpmd runs from the host's
view through the rootfs's own ld.so, like the af-xdp QEMU (lab/qemu.py): any uid in any
network namespace can start it, and host paths (device-plugin sockets, bpffs pins) mean what
they say. DPDK finds its PMD plugins at a compiled-in path, which from the host's view is
the host's, so argv() names the two it needs with -d.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import cache as labcache

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "dpdk-rootfs.sh"
BUILD_TIMEOUT = 20 * 60
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu",)
TESTPMD = "usr/bin/dpdk-testpmd"
PLUGINS = ("librte_net_af_xdp.so.25", "librte_mempool_ring.so.25")
ROOT_RUNTIME = Path("/var/run/dpdk")
# libxdp's BPF objects, for a PMD that loads its own program (no use_cni).
BPF_OBJECTS = "usr/lib/x86_64-linux-gnu/bpf"


@dataclass(frozen=True)
class Dpdk:
    """A cached rootfs holding dpdk-testpmd."""

    rootfs: Path

    @property
    def bpf_objects(self) -> Path:
        """Where libxdp must look (LIBXDP_OBJECT_PATH) from the host's view."""
        return self.rootfs / BPF_OBJECTS

    def testpmd(self) -> list[str]:
        """The command prefix running dpdk-testpmd (append EAL options, --, app options)."""
        libs = self.rootfs / LIBRARY_DIRS[0]
        argv = [str(self.rootfs / LOADER), "--library-path", str(libs), str(self.rootfs / TESTPMD)]
        for plugin in PLUGINS:
            argv += ["-d", str(libs / plugin)]
        return argv


def ensure_dpdk() -> Dpdk:
    """The cached rootfs, built first if missing (a debootstrap: a few minutes)."""
    path = labcache.entry("dpdk", SCRIPT.read_bytes(), labcache.BUILD_WORK.read_bytes())
    _check_plugin_path(path)
    return Dpdk(labcache.ensure(path, lambda dest: ["sh", str(SCRIPT), str(dest)], BUILD_TIMEOUT))


def _check_plugin_path(rootfs: Path) -> None:
    """DPDK's EAL loads no plugin (-d) below a directory others may write, sticky or not
    ("directory path /var/tmp is world-writable and insecure"): say so before it does."""
    for parent in rootfs.parents:
        if parent.exists() and parent.stat().st_mode & stat.S_IWOTH:
            raise RuntimeError(
                f"the DPDK rootfs {rootfs} lies below {parent}, which others may write, and "
                "DPDK refuses plugins there: point XSK_BROKER_TEST_CACHE elsewhere (the "
                "default /var/cache/xsk-broker-tests is fine)"
            )


class PmdRun:
    """dpdk-testpmd on one af_xdp port, forwarding in one mode until stop(); its output is
    read as it comes so that started() can tell when it forwards."""

    def __init__(self, command: list[str], **popen: Any) -> None:
        self.lines: list[str] = []
        # EAL makes a runtime directory even with --no-shconf and never removes it: as
        # root /var/run/dpdk/PREFIX, otherwise $XDG_RUNTIME_DIR/dpdk/PREFIX (else /tmp/dpdk,
        # left owned by the consumer's uid). Non-root runs get a private XDG_RUNTIME_DIR;
        # root's directory is removed when its prefix is one of ours (xskt*).
        self.runtime = Path(tempfile.mkdtemp(prefix="xskt-dpdk-"))
        self.runtime.chmod(0o1777)
        prefixes = [arg.split("=", 1)[1] for arg in command if arg.startswith("--file-prefix=")]
        self.root_runtime = [ROOT_RUNTIME / p for p in prefixes if p.startswith("xskt")]
        env = {**popen.pop("env", os.environ), "XDG_RUNTIME_DIR": str(self.runtime)}
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env, **popen,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def started(self, timeout: float = 60.0) -> bool:
        """True once it forwards (its first periodic statistics); False if it exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if "Port statistics" in self.output:
                return True
            time.sleep(0.05)
        return False

    def nic_stats(self) -> dict[int, tuple[int, int]]:
        """(rx, tx) packets per port in its latest periodic statistics (--stats-period)."""
        return {int(port): (int(rx), int(tx)) for port, rx, tx in _NIC.findall(self.output)}

    def stop(self) -> str:
        """SIGINT (testpmd prints its final per-queue statistics) and its whole output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)
        for runtime in (self.runtime, *self.root_runtime):
            shutil.rmtree(runtime, ignore_errors=True)
        if self.root_runtime:
            with contextlib.suppress(OSError):  # EAL made it; left if anyone else uses it
                ROOT_RUNTIME.rmdir()
        return self.output


def pmd_args(vdevs: list[str], forward: str) -> list[str]:
    """EAL and testpmd options for af_xdp vdevs of one queue each (DPDK sizes an af_xdp port
    by the combined channel count, which veth does not report, so on veth a port has one
    queue and a port per queue covers them all): no hugepages, no PCI, no shared config
    files, one forwarding lcore, periodic statistics instead of a prompt, few mbufs."""
    return [
        "--no-huge", "--no-pci", "-m", "512", "--no-shconf", "-l", "0-1",
        *(arg for vdev in vdevs for arg in ("--vdev", vdev)),
        "--", f"--forward-mode={forward}", "--stats-period=1", "--total-num-mbufs=8192",
    ]  # fmt: skip


_NIC = re.compile(
    r"NIC statistics for port (\d+)\s+#+\s*RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)", re.S
)
_PORT = re.compile(
    r"Forward statistics for\s+port\s+(\d+)\s+-+\s*RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)",
    re.S,
)


def port_stats(output: str) -> dict[int, tuple[int, int]]:
    """(rx, tx) packets per port from testpmd's final statistics."""
    return {int(port): (int(rx), int(tx)) for port, rx, tx in _PORT.findall(output)}
