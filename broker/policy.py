"""Who may have which AF_XDP sockets: the policy file and its decisions.

A brokered socket is raw access to a network interface, so nothing is allowed unless an
allow rule says so, and a matching deny rule always wins (as in qemu-bridge-helper's ACL).
Identity comes from the kernel (SO_PEERCRED, SO_PEERGROUPS), never from the request.

The file is TOML, parsed once into frozen dataclasses. Loading is all-or-nothing: any
problem in any included file raises PolicyError naming the file, line and reason, so the
server can keep the policy it has. Decisions are pure functions of the loaded policy and
what the server tells them; every denial names the rule outcome.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import grp
import itertools
import os
import pwd
import re
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeGuard

from broker import trust
from broker.config import DEFAULT_POLICY_PATH
from broker.errors import BadInput, BadRequest, Denied
from broker.protocol import MAX_QUEUES_PER_LEASE, MAX_UMEM_BYTES, MIN_UMEM_BYTES, Request

REQUEST_ACTION = "org.xsk-broker.request"
ADMIN_ACTION = "org.xsk-broker.admin"
ADMIN_OPS = ("revoke", "detach")
RULE_MODES = ("native", "skb")
EVERYONE = "*"
# QEMU registers 32 MiB per queue; twice that leaves room for larger rings, and bounds what a
# caller-chosen umem_bytes can make the broker do (raise_memlock) to a sane amount per queue.
DEFAULT_MAX_UMEM_BYTES_PER_QUEUE = 64 * 1024 * 1024
TOP_KEYS = ("include", "allow", "deny", "exclusive_tenancy")


class PolicyError(BadInput):
    """The policy file cannot be used; file and line say where, reason says why."""

    code = "BAD_POLICY"
    default_errno = errno.EINVAL

    def __init__(self, file: Path, line: int | None, reason: str) -> None:
        where = f"{file}:{line}" if line else str(file)
        super().__init__(f"{where}: {reason}", details={"file": str(file), "line": line})
        self.file = file
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    """The process asking, as the kernel reports it (SO_PEERCRED and SO_PEERGROUPS)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    pid: int
    pidfd: int = -1  # SO_PEERPIDFD on the process, owned by whoever made the Caller


@dataclass(frozen=True)
class Grant:
    """What an allow rule granted, and what the broker must still do before acting on it.

    mode: the XDP mode to attach in, decided here once: the one asked for, or the rule's
    only mode, or "auto" (native, then skb) when the rule allows both. polkit_action: when
    set, polkit must be asked for this action and say yes. raise_memlock: the broker may
    raise the consumer's RLIMIT_MEMLOCK (memlock.ensure(..., may_raise_to=...)), never beyond
    max_umem_bytes_per_queue for each queue the consumer's uid would then hold.
    """

    rule: str
    mode: str
    polkit_action: str | None
    raise_memlock: bool
    max_umem_bytes_per_queue: int = DEFAULT_MAX_UMEM_BYTES_PER_QUEUE


@dataclass(frozen=True)
class Rule:
    """One [[allow]] or [[deny]] table; deny rules use only the identity and interfaces."""

    kind: str
    name: str
    file: Path
    line: int | None
    users: frozenset[int]
    groups: frozenset[int]
    everyone: bool
    interfaces: tuple[str, ...] = (EVERYONE,)
    queues: tuple[tuple[int, int], ...] = ((0, sys.maxsize),)
    max_queues_per_lease: int = MAX_QUEUES_PER_LEASE
    max_queues_per_uid: int | None = None
    modes: tuple[str, ...] = RULE_MODES
    other_consumers: bool = False
    polkit: bool = False
    admin: bool = False
    raise_memlock: bool = False
    max_umem_bytes_per_queue: int = DEFAULT_MAX_UMEM_BYTES_PER_QUEUE

    @property
    def label(self) -> str:
        where = f"{self.file.name}:{self.line}" if self.line else self.file.name
        name = self.name if self.name.startswith("#") else repr(self.name)
        return f"{self.kind} rule {name} ({where})"

    def identity_match(self, caller: Caller) -> str | None:
        """What about the caller this rule matches ("uid 1000", "group 27"), or None."""
        if self.everyone:
            return "everyone"
        if caller.uid in self.users:
            return f"uid {caller.uid}"
        for gid in (caller.gid, *caller.groups):
            if gid in self.groups:
                return f"group {gid}"
        return None

    def covers(self, ifname: str | None) -> bool:
        """Whether the rule speaks about ifname (None: an operation on no one interface)."""
        if ifname is None:
            return EVERYONE in self.interfaces
        return any(fnmatch.fnmatchcase(ifname, pattern) for pattern in self.interfaces)

    def refusal(
        self, request: Request, caller: Caller, queues_held_by_uid: int, consumer_uid: int
    ) -> str | None:
        """Why this (identity-matching) allow rule does not grant request, or None."""
        first, last = request.start_queue, request.start_queue + request.queues - 1
        if not self.covers(request.ifname):
            return f"interface {request.ifname} is not in {', '.join(self.interfaces)}"
        if not any(lo <= first and last <= hi for lo, hi in self.queues):
            return f"queues {first}-{last} are not within {ranges_text(self.queues)}"
        if request.queues > self.max_queues_per_lease:
            return f"{request.queues} queues exceed its {self.max_queues_per_lease} per lease"
        if (
            self.max_queues_per_uid is not None
            and queues_held_by_uid + request.queues > self.max_queues_per_uid
        ):
            return (
                f"uid {caller.uid} holds {queues_held_by_uid} queues; {request.queues} more "
                f"exceed its {self.max_queues_per_uid} per uid"
            )
        if request.umem_bytes > self.max_umem_bytes_per_queue:
            return (
                f"umem_bytes {request.umem_bytes} exceed its max_umem_bytes_per_queue "
                f"{self.max_umem_bytes_per_queue}"
            )
        if request.mode != "auto" and request.mode not in self.modes:
            return f"mode {request.mode} is not in {', '.join(self.modes)}"
        if consumer_uid != caller.uid and not self.other_consumers:
            return (
                f"the consumer runs as uid {consumer_uid}, not as the caller's uid "
                f"{caller.uid}, and the rule has no other_consumers = true"
            )
        return None

    def grant(self, mode: str, action: str) -> Grant:
        return Grant(
            self.label,
            mode,
            action if self.polkit else None,
            self.raise_memlock,
            self.max_umem_bytes_per_queue,
        )


@dataclass(frozen=True)
class Policy:
    """A loaded policy: the top file, every file it drew in, and the rules in file order.

    exclusive_tenancy: an interface with a live lease is refused to consumers of any other
    uid (docs/security.md, "Tenants sharing an interface").
    """

    path: Path
    files: tuple[Path, ...]
    deny: tuple[Rule, ...]
    allow: tuple[Rule, ...]
    exclusive_tenancy: bool = True

    @classmethod
    def load(cls, path: Path | str = DEFAULT_POLICY_PATH) -> Policy:
        """Parse path and its includes; PolicyError on any problem, and then nothing is used."""
        reader = _PolicyReader()
        top = Path(path).absolute()
        reader.load(top, ())
        return cls(
            top,
            tuple(reader.files),
            tuple(reader.deny),
            tuple(reader.allow),
            reader.exclusive_tenancy,
        )

    def authorize(
        self, caller: Caller, request: Request, *, queues_held_by_uid: int, consumer_uid: int
    ) -> Grant:
        """Grant request or raise Denied naming the rule outcome.

        queues_held_by_uid: queues in the live leases the caller's uid requested.
        consumer_uid: the real uid of the process the sockets are for (caller's if the same).
        The first allow rule (in file order, includes after the including file) that
        permits the whole request decides the Grant.
        """
        self._check_deny(caller, request.ifname)
        reasons = []
        for rule in self._allowing(caller):
            why = rule.refusal(request, caller, queues_held_by_uid, consumer_uid)
            if why is None:
                only = rule.modes[0] if len(rule.modes) == 1 else "auto"
                return rule.grant(only if request.mode == "auto" else request.mode, REQUEST_ACTION)
            reasons.append(f"{rule.label}: {why}")
        raise Denied(f"{describe(caller)}: " + "; ".join(reasons))

    def authorize_admin(self, caller: Caller, op: str, *, ifname: str | None = None) -> Grant:
        """Grant an admin op (revoke, detach) on ifname, or raise Denied naming the outcome."""
        if op not in ADMIN_OPS:
            raise BadRequest(f"admin op {op!r} is not one of {', '.join(ADMIN_OPS)}")
        self._check_deny(caller, ifname)
        for rule in self._allowing(caller):
            if rule.admin and rule.covers(ifname):
                return rule.grant("auto", ADMIN_ACTION)
        target = f" on {ifname}" if ifname else ""
        raise Denied(f"{describe(caller)} matches no allow rule with admin = true for {op}{target}")

    def administers(self, caller: Caller, ifname: str) -> bool:
        """Whether caller may administer ifname (status shows it the interface's leases):
        an allow rule with admin = true covers it and no deny rule applies. polkit is not
        asked: this only decides what caller may see."""
        try:
            self._check_deny(caller, ifname)
        except Denied:
            return False
        return any(
            rule.admin and rule.covers(ifname) and rule.identity_match(caller)
            for rule in self.allow
        )

    def _check_deny(self, caller: Caller, ifname: str | None) -> None:
        for rule in self.deny:
            matched = rule.identity_match(caller)
            if matched and (ifname is None or rule.covers(ifname)):
                raise Denied(f"{rule.label} matches {matched}", details={"rule": rule.label})

    def _allowing(self, caller: Caller) -> list[Rule]:
        rules = [rule for rule in self.allow if rule.identity_match(caller)]
        if not rules:
            raise Denied(f"{describe(caller)} matches no allow rule in {self.path}")
        return rules


def describe(caller: Caller) -> str:
    """'uid 1000 (alice)': the number is the truth, the name helps the reader."""
    try:
        return f"uid {caller.uid} ({pwd.getpwuid(caller.uid).pw_name})"
    except KeyError:
        return f"uid {caller.uid}"


def ranges_text(ranges: Iterable[tuple[int, int]]) -> str:
    return ", ".join(
        f"{lo}" if lo == hi else f"{lo}-" if hi == sys.maxsize else f"{lo}-{hi}"
        for lo, hi in ranges
    )


class _Source:
    """One policy file's text, to point errors at the line of a table or key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def error(self, reason: str, line: int | None = None) -> PolicyError:
        return PolicyError(self.path, line, reason)

    def table_line(self, kind: str, index: int) -> int | None:
        """Line of the index-th [[kind]] header."""
        header = re.compile(rf"^\s*\[\[\s*{kind}\s*\]\]")
        seen = -1
        for number, line in enumerate(self.lines, 1):
            if header.match(line):
                seen += 1
                if seen == index:
                    return number
        return None

    def key_line(self, key: str, after: int | None = None) -> int | None:
        """Line of `key =` at top level (after=None) or in the table starting at line after."""
        assignment = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for number in range(after or 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if number != after and line.lstrip().startswith("["):
                break
            if assignment.match(line):
                return number
        return after


class _PolicyReader:
    """Reads a policy file and its includes depth-first, each file once."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.deny: list[Rule] = []
        self.allow: list[Rule] = []
        self.exclusive_tenancy = True

    def load(self, path: Path, stack: tuple[Path, ...]) -> None:
        real = path.resolve()
        if real in stack:
            chain = " -> ".join(str(p) for p in (*stack, real))
            raise PolicyError(stack[-1], None, f"include loop: {chain}")
        if real in self.files:
            return
        source = _Source(path, _read(path))
        try:
            body = tomllib.loads("\n".join(source.lines))
        except tomllib.TOMLDecodeError as exc:
            found = re.search(r"at line (\d+)", str(exc))
            line = int(found.group(1)) if found else len(source.lines) or None
            raise source.error(str(exc), line) from None
        self.files.append(real)
        for key in body:
            if key not in TOP_KEYS:
                raise source.error(
                    f"unknown key {key!r} (known: {', '.join(TOP_KEYS)})", source.key_line(key)
                )
        if "exclusive_tenancy" in body:
            self.exclusive_tenancy = _tenancy(source, body["exclusive_tenancy"], top=not stack)
        for kind in ("deny", "allow"):
            tables = body.get(kind, [])
            if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
                raise source.error(f"{kind} must be [[{kind}]] tables", source.key_line(kind))
            rules = self.deny if kind == "deny" else self.allow
            rules.extend(_Rule(source, kind, i, table).build() for i, table in enumerate(tables))
        for included in _includes(source, body.get("include", [])):
            self.load(included, (*stack, real))


def _tenancy(source: _Source, value: object, *, top: bool) -> bool:
    """exclusive_tenancy = true|false, a setting of the whole policy: only in the top file."""
    line = source.key_line("exclusive_tenancy")
    if not top:
        raise source.error("exclusive_tenancy may be set only in the top policy file", line)
    if not isinstance(value, bool):
        raise source.error(f"exclusive_tenancy must be true or false, got {value!r}", line)
    return value


def _read(path: Path) -> str:
    """The file's text, refusing it when others than root or the broker could change the
    file or any directory on the way to it (broker.trust)."""
    try:
        real = trust.check_file_path("policy file", path)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        with open(os.open(real, flags), "rb") as f:
            trust.check_file("policy file", real, os.fstat(f.fileno()))
            data = f.read()
    except trust.UntrustedPath as exc:
        raise PolicyError(path, None, exc.message) from None
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(path, line, f"is not UTF-8: {exc.reason}") from None


def _is_str_list(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _includes(source: _Source, value: object) -> list[Path]:
    """include = ["file.toml", "dir/*.toml"], relative to the including file's directory."""
    line = source.key_line("include")
    if not _is_str_list(value):
        raise source.error("include must be a list of file names or glob patterns", line)
    found = []
    for entry in value:
        pattern = source.path.parent / entry
        if glob.has_magic(entry):
            _check_glob_directory(source, pattern, line)
            found.extend(sorted(Path(p) for p in glob.glob(str(pattern))))
        elif pattern.exists():
            found.append(pattern)
        else:
            raise source.error(f"included file {pattern} does not exist", line)
    return found


def _check_glob_directory(source: _Source, pattern: Path, line: int | None) -> None:
    """The directory a glob include lists (up to its first wildcard) must be safe too:
    whoever may create, rename or remove files there adds or takes away rules."""
    fixed = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), pattern.parts))
    try:
        trust.check_new_directory("policy include directory", fixed)
    except trust.UntrustedPath as exc:
        raise source.error(exc.message, line) from None


class _Rule:
    """Turns one [[allow]]/[[deny]] table into a Rule, pointing errors at the right line."""

    ALLOW_KEYS = frozenset(
        (
            "name",
            "users",
            "groups",
            "interfaces",
            "queues",
            "max_queues_per_lease",
            "max_queues_per_uid",
            "modes",
            "other_consumers",
            "polkit",
            "admin",
            "raise_memlock",
            "max_umem_bytes_per_queue",
        )
    )
    DENY_KEYS = frozenset(("name", "users", "groups", "interfaces"))

    def __init__(self, source: _Source, kind: str, index: int, table: dict[str, object]) -> None:
        self.source = source
        self.kind = kind
        self.table = table
        self.line = source.table_line(kind, index)
        self.index = index

    def fail(self, key: str, reason: str) -> PolicyError:
        return self.source.error(
            f"{self.kind} rule: {key}: {reason}", self.source.key_line(key, self.line)
        )

    def build(self) -> Rule:
        known = self.ALLOW_KEYS if self.kind == "allow" else self.DENY_KEYS
        for key in self.table:
            if key not in known:
                raise self.fail(
                    key, f"unknown key (known in [[{self.kind}]]: {', '.join(sorted(known))})"
                )
        users, everyone_u = self.ids("users", _uid_of)
        groups, everyone_g = self.ids("groups", _gid_of)
        if not (users or groups or everyone_u or everyone_g):
            raise self.source.error(
                f'{self.kind} rule matches nobody: give users or groups ("*" for everyone)',
                self.line,
            )
        name = self.table.get("name", f"#{self.index + 1}")
        if not isinstance(name, str) or not name:
            raise self.fail("name", "must be a non-empty string")
        common = Rule(
            kind=self.kind,
            name=name,
            file=self.source.path,
            line=self.line,
            users=frozenset(users),
            groups=frozenset(groups),
            everyone=everyone_u or everyone_g,
            interfaces=self.strings("interfaces", (EVERYONE,), _check_pattern),
        )
        if self.kind == "deny":
            return common
        queues = self.queueranges_text()
        per_lease = self.count("max_queues_per_lease")
        return replace(
            common,
            queues=queues,
            max_queues_per_lease=MAX_QUEUES_PER_LEASE if per_lease is None else per_lease,
            max_queues_per_uid=self.count("max_queues_per_uid"),
            modes=self.strings("modes", RULE_MODES, _check_mode),
            other_consumers=self.flag("other_consumers"),
            polkit=self.flag("polkit"),
            admin=self.flag("admin"),
            raise_memlock=self.flag("raise_memlock"),
            max_umem_bytes_per_queue=self.umem(),
        )

    def ids(self, key: str, resolve: Callable[[str], int]) -> tuple[set[int], bool]:
        """Numeric ids and names resolved now: a name that does not exist is an error."""
        values = self.table.get(key, [])
        if not isinstance(values, list):
            raise self.fail(key, 'must be a list of names, numbers or "*"')
        ids: set[int] = set()
        everyone = False
        for value in values:
            if value == EVERYONE:
                everyone = True
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
                ids.add(value)
            elif isinstance(value, str) and value:
                try:
                    ids.add(resolve(value))
                except KeyError:
                    raise self.fail(key, f"{value!r} does not exist") from None
            else:
                raise self.fail(key, f'{value!r} is not a name, a number or "*"')
        return ids, everyone

    def strings(
        self, key: str, default: tuple[str, ...], check: Callable[[object], str | None]
    ) -> tuple[str, ...]:
        """A non-empty list whose every entry check() accepts (it accepts only strings)."""
        values = self.table.get(key, list(default))
        if not isinstance(values, list) or not values:
            raise self.fail(key, "must be a non-empty list of strings")
        strings: list[str] = []
        for value in values:
            reason = check(value)
            if reason or not isinstance(value, str):
                raise self.fail(key, reason or f"{value!r} is not a string")
            strings.append(value)
        return tuple(strings)

    def queueranges_text(self) -> tuple[tuple[int, int], ...]:
        """queues = [0, "4-7", "8-"]: single queues and inclusive ranges; default all."""
        values = self.table.get("queues", ["0-"])
        if not isinstance(values, list) or not values:
            raise self.fail("queues", 'must be a non-empty list like [0, "2-5", "8-"]')
        ranges: list[tuple[int, int]] = []
        for value in values:
            parsed = _queue_range(value)
            if parsed is None:
                raise self.fail("queues", f'{value!r} is not a queue number or range like "2-5"')
            ranges.append(parsed)
        return tuple(ranges)

    def count(self, key: str) -> int | None:
        """A positive whole number, or None when the key is not given."""
        if key not in self.table:
            return None
        value = self.table[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self.fail(key, f"must be a positive whole number, got {value!r}")
        if key == "max_queues_per_lease" and value > MAX_QUEUES_PER_LEASE:
            raise self.fail(key, f"must be at most {MAX_QUEUES_PER_LEASE}, got {value}")
        return value

    def umem(self) -> int:
        """max_umem_bytes_per_queue: bytes, within what a request may declare at all."""
        key = "max_umem_bytes_per_queue"
        value = self.table.get(key, DEFAULT_MAX_UMEM_BYTES_PER_QUEUE)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not MIN_UMEM_BYTES <= value <= MAX_UMEM_BYTES
        ):
            raise self.fail(key, f"must be bytes in {MIN_UMEM_BYTES}..2^40, got {value!r}")
        return value

    def flag(self, key: str) -> bool:
        value = self.table.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _check_pattern(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > 64:
        return f"{value!r} is not an interface name pattern"
    return None


def _check_mode(value: object) -> str | None:
    if value not in RULE_MODES:
        return f"{value!r} is not one of {', '.join(RULE_MODES)}"
    return None


def _queue_range(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value) if value >= 0 else None
    found = re.fullmatch(r"\s*(\d+)\s*-\s*(\d*)\s*", value) if isinstance(value, str) else None
    if not found:
        return None
    lo, hi = int(found.group(1)), int(found.group(2)) if found.group(2) else sys.maxsize
    return (lo, hi) if lo <= hi else None
