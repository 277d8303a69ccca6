"""Whether a path is safe for the broker to trust: nobody but root or the broker could change it.

Every directory and file the broker trusts (the socket's directory, the state directory and
its lease journal, the pin root, the policy file and each include) is checked here, in one
way, so that a directory another uid created or can write is refused with one line naming
the path, its owner and its mode. The rule is sshd's StrictModes, from / down:

- every directory a lookup passes through is owned by root or the broker's uid, and not
  writable by group or others, unless it is sticky (like /tmp: others cannot rename or
  remove what they do not own there);
- every symlink followed is owned by root or the broker's uid;
- the directory the broker keeps its files in (the one named, or the one holding a named
  file) is not writable by group or others at all, sticky or not: in /tmp anyone may
  create the broker's file names (the socket's too) before it does. The broker may create
  such a directory inside a sticky one, and checks afterwards that the one there is its own;
- a file is owned by root or the broker's uid and not writable by group or others.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from broker.errors import Failed

_MAX_SYMLINKS = 40  # the kernel's own limit (MAXSYMLINKS)


class UntrustedPath(Failed):
    """A path the broker would trust could be changed by another uid."""

    code = "UNTRUSTED_PATH"
    default_errno = errno.EPERM


def trusted_uids() -> frozenset[int]:
    """Owners whose files the broker trusts: root and the uid it runs as."""
    return frozenset((0, os.geteuid()))


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def refusal(what: str, path: str | Path, info: os.stat_result, problem: str) -> UntrustedPath:
    """The one-line refusal: what was refused, the path at fault, its owner and mode, and why."""
    mode = stat.S_IMODE(info.st_mode)
    return UntrustedPath(
        f"{what}: {path} is owned by {_owner(info.st_uid)} with mode {mode:04o} ({problem}); "
        f"the broker trusts only paths that root or uid {os.geteuid()} alone can change: "
        f"chown root and chmod go-w it, or choose another path",
        details={"path": str(path), "uid": info.st_uid, "mode": f"{mode:04o}"},
    )


def _problem(info: os.stat_result, *, sticky_ok: bool) -> str | None:
    if info.st_uid not in trusted_uids():
        return "not owned by root or the broker's uid"
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (sticky_ok and info.st_mode & stat.S_ISVTX):
        return "writable by group or others"
    return None


def _check(what: str, path: str, info: os.stat_result, *, sticky_ok: bool = False) -> None:
    problem = _problem(info, sticky_ok=sticky_ok)
    if problem is not None:
        raise refusal(what, path, info, problem)


def _resolve(what: str, path: Path) -> tuple[str, list[str]]:
    """Follow path as the kernel would, checking every directory looked into and every
    symlink followed; returns the real path and the part of it that does not exist yet."""
    todo = list(reversed(Path(os.path.join(os.getcwd(), path)).parts))
    current, hops = "/", 0
    while todo:
        name = todo.pop()
        if name == "/":
            current = "/"
            continue
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        _check(what, current, os.stat(current), sticky_ok=True)
        candidate = os.path.join(current, name)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return current, [name, *reversed(todo)]
        except OSError as exc:  # EACCES, ENOTDIR: what cannot be looked at cannot be trusted
            raise UntrustedPath(
                f"{what}: {path}: cannot look at {candidate}: {exc.strerror}", errno=exc.errno
            ) from None
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise UntrustedPath(f"{what}: {path}: too many symlinks", errno=errno.ELOOP)
            if info.st_uid not in trusted_uids():  # a link's own mode means nothing
                raise refusal(what, candidate, info, "a link not owned by root or the broker")
            todo.extend(reversed(Path(os.readlink(candidate)).parts))
        else:
            current = candidate
    return current, []


def check_directory(what: str, path: Path) -> None:
    """Refuse (UntrustedPath) unless path, an existing directory, and the way to it are safe.

    what says which of the broker's paths it is ("state directory"), for the message.
    """
    real, missing = _resolve(what, path)
    if missing:
        raise UntrustedPath(f"{what}: {path} does not exist", errno=errno.ENOENT)
    _check(what, real, os.stat(real))


def check_new_directory(what: str, path: Path) -> None:
    """Refuse unless path is a safe directory, or ensure_directory() could make it one: its
    nearest existing ancestor is safe (or sticky, as /tmp is); changes nothing."""
    real, missing = _resolve(what, path)
    _check(what, real, os.stat(real), sticky_ok=bool(missing))


def ensure_directory(what: str, path: Path, mode: int) -> None:
    """Make path a safe directory: check the way there, create what is missing with mode
    (whatever the umask), and check again, so a name another uid took first is refused."""
    real, missing = _resolve(what, path)
    _check(what, real, os.stat(real), sticky_ok=bool(missing))
    for name in missing:
        real = os.path.join(real, name)
        try:
            os.mkdir(real, mode)
        except FileExistsError:
            break
        os.chmod(real, mode)
    check_directory(what, path)


def check_file_path(what: str, path: Path) -> str:
    """The real path of a file the broker will open or create, once the directory holding it
    and the way there are safe; the file itself is checked by check_file() once open."""
    real, missing = _resolve(what, path)
    if len(missing) > 1:
        raise UntrustedPath(
            f"{what}: {path}: {os.path.join(real, missing[0])} does not exist", errno=errno.ENOENT
        )
    if missing:
        _check(what, real, os.stat(real))
        return os.path.join(real, missing[0])
    holder = os.path.dirname(real)
    _check(what, holder, os.stat(holder))
    return real


def check_file(what: str, path: str | Path, info: os.stat_result) -> None:
    """Refuse an opened file (info: its fstat) another uid owns or could write."""
    if not stat.S_ISREG(info.st_mode):
        raise refusal(what, path, info, "not a regular file")
    _check(what, str(path), info)
