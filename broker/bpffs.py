"""The bpffs the pins live on: where it is, mounting it when nobody has, removing pins.

Pins are files in a bpffs; only a bpffs keeps a link alive after its last fd closes, so the
broker checks the filesystem type rather than trusting a path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

from broker import trust
from broker.config import DEFAULT_PIN_ROOT
from broker.errors import AttachFailed

BPF_FS_MAGIC = 0xCAFE4A11


class _Statfs(ctypes.Structure):
    """struct statfs up to f_type; the rest is room for the kernel to write into."""

    _fields_ = (("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def is_bpffs(path: Path) -> bool:
    """Whether path is on a bpffs (statfs's f_type; os.statvfs does not report it)."""
    buf = _Statfs()
    result: int = _libc().statfs(str(path).encode(), ctypes.byref(buf))
    return result == 0 and buf.f_type == BPF_FS_MAGIC


def ensure_bpffs(pin_root: Path) -> None:
    """Make pin_root's directory, mounting bpffs at /sys/fs/bpf first if nobody has; a
    pin_root on a bpffs already (a mount point of its own, say) is used as it is.

    A pin root others could write is refused before anything is mounted (broker.trust):
    whoever can rename the pins can make a restarted broker lose its attachments. The
    broker's own mount is mode 0700; bpffs's default is 1777.
    """
    trust.check_new_directory("pin directory", pin_root)
    if is_bpffs(pin_root):
        return
    anchor = pin_root.parent
    if not is_bpffs(anchor) and anchor == DEFAULT_PIN_ROOT.parent:
        libc = _libc()
        if libc.mount(b"bpf", str(anchor).encode(), b"bpf", 0, b"mode=0700") != 0:
            err = ctypes.get_errno()
            raise AttachFailed(
                f"bpffs is not mounted at {anchor} and mounting it failed "
                f"({os.strerror(err)}); run: mount -t bpf -o mode=0700 bpf {anchor}",
                errno=err,
            )
    if not is_bpffs(anchor):
        raise AttachFailed(
            f"{anchor} is not a bpffs mount; mount one (mount -t bpf -o mode=0700 bpf {anchor}) "
            "or choose another --pin-dir",
            errno=errno.ENOTDIR,
        )
    trust.ensure_directory("pin directory", pin_root, 0o700)


def lease_pin_dir(pin_root: Path) -> Path:
    """Where `serve --map-pins` pins map leases: beside pin_root, since consumers must
    traverse the directory and pin_root is 0700."""
    return pin_root.with_name(pin_root.name + "-leases")


def check_lease_pin_dir(pin_root: Path) -> None:
    """Refuse at start a pin_root whose parent is no bpffs (a mount point itself), where
    every map lease's pin would fail."""
    if not is_bpffs(pin_root.parent):
        raise AttachFailed(
            f"--map-pins pins map leases in {lease_pin_dir(pin_root)}, beside --pin-dir, but "
            f"{pin_root.parent} is not a bpffs: pass a --pin-dir below the bpffs mount point "
            f"(such as {pin_root / 'xsk-broker'})",
            errno=errno.ENOTDIR,
        )


def remove_pins(pin_dir: Path) -> None:
    """Remove one interface's pin directory, if any; it only ever holds pin files.

    Not shutil.rmtree: importing shutil (it loads bz2 and lzma) costs 3-6 ms on this VM,
    for a directory of two files.
    """
    with contextlib.suppress(OSError):
        for entry in os.scandir(pin_dir):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(pin_dir)
