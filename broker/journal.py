"""The lease journal's file: read back only records the broker could have written, rewrite
it without ever following a link, and keep it unreadable to others.

The journal decides which queues a restarted broker keeps refusing, so a forged or mangled
record must not become a lease: the state directory and the file are checked with
broker.trust before a byte is read, and every record is validated field by field. A record
that fails is logged (escaped) and skipped, like a torn last line after a crash: the file
comes from root or the broker itself, so a bad record is damage, not an attack, and a
queue whose lease it forgets stays busy in the kernel's map for as long as its consumer
holds the socket. The file is 0600 whatever the umask; an older one that others could read
is rewritten 0600 at start (restore compacts), one that others could write refuses start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict, final

from broker import trust
from broker.errors import BrokerError
from broker.protocol import (
    MAX_QUEUES_PER_LEASE,
    MAX_TAG_CHARS,
    PID_MAX_LIMIT,
    Body,
    LeaseInfo,
    validate_ifname,
    validate_lease_id,
)

log = logging.getLogger("xsk-broker")

STATE_FILE = "leases.jsonl"
TEMP_FILE = "leases.tmp"
FILE_MODE = 0o600
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SAMPLE = LeaseInfo("0" * 12, "lo", 1, [0], "skb").to_wire()  # the fields a record holds
_LEASE_FIELDS, _EXTRA_FIELDS = _SAMPLE.keys(), _SAMPLE["extra"].keys()
# A map lease's extra fields besides those (protocol.LeaseInfo): its handout and paths.
_MAP_FIELDS = LeaseInfo("0" * 12, "lo", 1, [0], "skb", handout="map").to_wire()["extra"].keys()
_MAX_ID = 2**32 - 2  # uids and gids; (uid_t)-1 means "none"


@final  # so that `"add" in entry` tells the two kinds of line apart
class Added(TypedDict):
    """A journal line for a new lease: its wire form and the consumer's start time."""

    add: Body
    start_time: int


@final
class Ended(TypedDict):
    end: str


Entry = Added | Ended


def read(state_dir: Path) -> list[Entry]:
    """The journal's valid records, in order; [] when there is none yet.

    Raises UntrustedPath when the directory or the file could have been written by another
    uid (then nothing in it can be believed).
    """
    trust.check_directory("state directory", state_dir)
    path = state_dir / STATE_FILE
    try:
        fd = os.open(path, _READ)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise trust.refusal("lease journal", path, path.lstat(), "a symlink") from None
        raise
    with open(fd, "rb") as f:
        trust.check_file("lease journal", path, os.fstat(fd))
        data = f.read()
    return list(_valid(path, data.splitlines()))


def rewrite(state_dir: Path, lines: list[bytes]) -> int:
    """Replace the journal with lines (atomically); returns an fd that appends to it.

    The temporary file is created anew (O_EXCL, never through a link left at its name) with
    mode 0600 whatever the umask.
    """
    path, tmp = state_dir / STATE_FILE, state_dir / TEMP_FILE
    try:
        fd = os.open(tmp, _CREATE, FILE_MODE)
    except FileExistsError:  # left by a crash: unlink removes a link itself, not its target
        os.unlink(tmp)
        fd = os.open(tmp, _CREATE, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, b"".join(lines))
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _valid(path: Path, lines: list[bytes]) -> Iterator[Entry]:
    """The records that pass _checked(); the others are logged with their bytes escaped."""
    for number, line in enumerate(lines, 1):
        try:
            yield _checked(json.loads(line))
        except (ValueError, BrokerError) as exc:
            log.warning("%s:%d: record skipped (%s): %r", path, number, exc, line[:200])


def _checked(record: Any) -> Entry:
    """record if it is one the broker writes, else ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not an object")
    if record.keys() == {"end"}:
        validate_lease_id(_typed(record, "end", str))
        ended: Ended = {"end": record["end"]}
        return ended
    if record.keys() != {"add", "start_time"}:
        raise ValueError(f"unknown fields {sorted(record)}")
    _ranged(record, "start_time", 0, 2**63)
    _check_lease(_typed(record, "add", dict))
    added: Added = {"add": record["add"], "start_time": record["start_time"]}
    return added


def _check_lease(body: Body) -> None:
    if body.keys() != _LEASE_FIELDS:
        raise ValueError(f"lease fields {sorted(body)} are not {sorted(_LEASE_FIELDS)}")
    validate_lease_id(_typed(body, "lease_id", str))
    validate_ifname(_typed(body, "ifname", str))
    _ranged(body, "ifindex", 1, 2**31 - 1)
    queues = _typed(body, "queue_ids", list)
    if not 1 <= len(queues) <= MAX_QUEUES_PER_LEASE:
        raise ValueError(f"{len(queues)} queue ids")
    for offset, queue in enumerate(queues):
        if type(queue) is not int or queue != queues[0] + offset or not 0 <= queue < 2**16:
            raise ValueError(f"queue_ids {queues!r} are not consecutive queue numbers")
    if body["mode"] not in ("native", "skb"):
        raise ValueError(f"mode {body['mode']!r}")
    _ranged(body, "uid", 0, _MAX_ID)
    _ranged(body, "pid", 0, PID_MAX_LIMIT)
    _ranged(body, "consumer_pid", 1, PID_MAX_LIMIT)
    tag = body["tag"]
    if tag is not None and not (
        isinstance(tag, str) and len(tag) <= MAX_TAG_CHARS and tag.isprintable()
    ):
        raise ValueError(f"tag is not at most {MAX_TAG_CHARS} printable characters")
    _ranged(body, "umem_bytes", 1, 2**40)
    created = body["created"]
    if type(created) not in (int, float) or not math.isfinite(created) or created < 0:
        raise ValueError(f"created {created!r}")
    extra = _typed(body, "extra", dict)
    if extra.keys() not in (_EXTRA_FIELDS, _MAP_FIELDS):
        raise ValueError(f"extra fields {sorted(extra)}")
    if extra.keys() == _MAP_FIELDS:
        if extra["handout"] != "map":
            raise ValueError(f"handout {extra['handout']!r}")
        for name in ("dp_path", "map_pin"):
            path = _typed(extra, name, str)
            if len(path) > 4096 or not path.isprintable():
                raise ValueError(f"{name} is not a printable path")
    _ranged(extra, "consumer_uid", 0, _MAX_ID)
    if len(_typed(extra, "rule", str)) > 512:
        raise ValueError("rule name too long")


def _typed(body: Body, name: str, kind: type) -> Any:
    value = body[name]
    if type(value) is not kind:
        raise ValueError(f"{name} is {type(value).__name__}, not {kind.__name__}")
    return value


def _ranged(body: Body, name: str, low: int, high: int) -> int:
    value: int = _typed(body, name, int)
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is not within {low}..{high}")
    return value
