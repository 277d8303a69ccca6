"""Built-once artifacts of the lab (container rootfs, af-xdp QEMU, guest image), cached
outside the checkout and keyed by a hash of their inputs.

Each entry is built by a script into ENTRY.tmp-PID and renamed at the end, so an entry is
complete or absent; one builder at a time (flock). XSK_BROKER_TEST_CACHE moves the cache
(`make test-fresh` points it at an empty directory). Unprivileged test processes (QEMU as
another uid) read entries by path, so the cache must be traversable by everyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

CACHE = Path(os.environ.get("XSK_BROKER_TEST_CACHE", "/var/cache/xsk-broker-tests"))


class CacheNotTraversable(RuntimeError):
    """The cache is not reachable by the unprivileged uids that use its entries."""


def entry(kind: str, *inputs: bytes) -> Path:
    """The cache entry of kind for these inputs (a build script's bytes, versions, ...)."""
    digest = hashlib.sha256()
    for part in inputs:
        digest.update(hashlib.sha256(part).digest())
    return CACHE / f"{kind}-{digest.hexdigest()[:16]}"


def ensure(path: Path, build: Callable[[Path], Sequence[str]], timeout: float) -> Path:
    """path, first built if missing by running the command build(path) returns."""
    _make_dirs(CACHE)
    check_traversable(CACHE)
    if path.is_dir():
        return path
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_dir():
            for stale in CACHE.glob(f"{path.name}.tmp-*"):  # builders killed outright
                subprocess.run(["rm", "-rf", "--one-file-system", str(stale)], check=True)
            _build(build(path), timeout)
    return path


def check_traversable(path: Path) -> None:
    """Raise CacheNotTraversable unless other users may pass through path and every
    directory above it (o+x)."""
    path = path.resolve()
    for directory in reversed((path, *path.parents)):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise CacheNotTraversable(
                f"test cache {path}: {directory} (mode {stat.S_IMODE(mode):04o}) is not "
                "traversable by other users, but unprivileged test processes read the cache; "
                "set XSK_BROKER_TEST_CACHE to a directory others can traverse"
            )


def _make_dirs(path: Path) -> None:
    """mkdir -p, with 0755 for what it creates whatever the umask."""
    missing = [d for d in (path, *path.parents) if not d.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
            directory.chmod(0o755)


def _build(argv: Sequence[str], timeout: float) -> None:
    """Run a build script in its own process group; stop all of it if we are stopped."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        status = process.wait(timeout=timeout)
    except BaseException:
        _stop(process)
        raise
    if status != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed with exit status {status}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group (the script's trap removes its temp dir), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
