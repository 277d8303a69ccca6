"""Built-once artifacts of the lab (container rootfs, af-xdp QEMU, guest image), cached
outside the checkout and keyed by a hash of their inputs.

Each entry is built by a script into ENTRY.tmp-PID and renamed at the end, so an entry is
complete or absent; one builder at a time (flock). XSK_BROKER_TEST_CACHE moves the cache
(`make test-fresh` points it at an empty directory). Unprivileged test processes (QEMU as
another uid) read entries by path, so the cache must be traversable by everyone; root runs
what is in it, so nobody else may be able to change it (checked on every use).
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
# What the builder scripts that source it share (their entries are keyed by its bytes too).
BUILD_WORK = Path(__file__).resolve().parent.parent / "scripts" / "build-work.sh"


class CacheNotTrusted(RuntimeError):
    """The cache is not reachable by the unprivileged uids that use its entries, or could be
    changed by someone other than root."""


def entry(kind: str, *inputs: bytes) -> Path:
    """The cache entry of kind for these inputs (a build script's bytes, versions, ...)."""
    digest = hashlib.sha256()
    for part in inputs:
        digest.update(hashlib.sha256(part).digest())
    return CACHE / f"{kind}-{digest.hexdigest()[:16]}"


# Builds that failed in this process: not tried again by the next test that wants them.
_failed: dict[str, str] = {}  # by entry name


def ensure(path: Path, build: Callable[[Path], Sequence[str]], timeout: float) -> Path:
    """path, first built if missing by running the command build(path) returns."""
    _make_dirs(CACHE)
    check_trusted(CACHE)
    if path.name in _failed:
        raise RuntimeError(_failed[path.name])
    if path.is_dir():
        check_trusted(path)
        return path
    lock = os.open(CACHE / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_dir():
            _remove_stale(path)
            try:
                _build(build(path), timeout)
            except RuntimeError as exc:
                _failed[path.name] = str(exc)
                raise
    finally:
        os.close(lock)
    return path


def _remove_stale(path: Path) -> None:
    """Temp dirs of builders that were killed outright (their trap never ran)."""
    for stale in CACHE.glob(f"{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue  # an orphaned builder may still be running: leave it its dir
        subprocess.run(["rm", "-rf", "--one-file-system", str(stale)], check=True)


def check_trusted(path: Path) -> None:
    """Raise CacheNotTrusted unless path and every directory above it may be traversed by
    other users (o+x: unprivileged test processes read entries) and only root or this user
    could have changed them (what is in there runs as root)."""
    path = path.resolve()
    for directory in reversed((path, *path.parents)):
        info = directory.stat()
        mode = stat.S_IMODE(info.st_mode)
        problem = None
        if not mode & stat.S_IXOTH:
            problem = "is not traversable by other users, who read the cache"
        elif info.st_uid not in (0, os.geteuid()):
            problem = f"belongs to uid {info.st_uid}, who could replace what root runs from it"
        elif mode & 0o022 and not (mode & stat.S_ISVTX and directory != path):
            problem = "is writable by others, who could replace what root runs from it"
        if problem:
            raise CacheNotTrusted(
                f"test cache {path}: {directory} (owner {info.st_uid}, mode {mode:04o}) "
                f"{problem}; set XSK_BROKER_TEST_CACHE to a directory of root's that others "
                "can traverse but not write"
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
