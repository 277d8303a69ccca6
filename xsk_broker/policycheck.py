"""`xsk-broker policy check [FILE] [--as USER] [--json]`: is the file valid, and what would
USER get under it and why. Exit status: 0 valid, 1 broken file, 2 unknown user."""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys
from pathlib import Path
from typing import NotRequired, TypedDict

from broker.config import DEFAULT_POLICY_PATH
from broker.errors import UsageError
from broker.policy import (
    ADMIN_OPS,
    EVERYONE,
    REQUEST_ACTION,
    Caller,
    Policy,
    PolicyError,
    describe,
    ranges_text,
)


def _group(gid: int) -> str:
    try:
        return f"{gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return str(gid)


def explain(policy: Policy, caller: Caller) -> str:
    """What caller may do under policy, rule by rule, for `xsk-broker policy check --as`."""
    gids = ", ".join(_group(gid) for gid in dict.fromkeys((caller.gid, *caller.groups)))
    lines = [
        f"policy {policy.path} ({len(policy.files)} file(s), {len(policy.allow)} allow and "
        f"{len(policy.deny)} deny rule(s))",
        f"caller {describe(caller)}, groups {gids}",
        f"exclusive tenancy: {_tenancy(policy)}",
    ]
    for rule in policy.deny:
        matched = rule.identity_match(caller)
        if matched:
            lines.append(
                f"DENIED by {rule.label} (matches {matched}) on interfaces "
                f"{', '.join(rule.interfaces)}; deny rules win over any allow rule"
            )
    allowing = [rule for rule in policy.allow if rule.identity_match(caller)]
    if not allowing:
        lines.append("no allow rule matches: everything is denied (deny by default)")
    for rule in allowing:
        per_uid = rule.max_queues_per_uid or "unlimited"
        lines += [
            f"{rule.label} matches {rule.identity_match(caller)}:",
            f"  interfaces {', '.join(rule.interfaces)}; queues {ranges_text(rule.queues)}",
            f"  at most {rule.max_queues_per_lease} queue(s) per lease, {per_uid} per uid",
            f"  modes {', '.join(rule.modes)}",
            "  consumers of any uid" if rule.other_consumers else "  consumers of its own uid only",
            f"  polkit must also agree ({REQUEST_ACTION})" if rule.polkit else "  polkit not asked",
            f"  admin ops ({', '.join(ADMIN_OPS)}): {'yes' if rule.admin else 'no'}",
            f"  at most {rule.max_umem_bytes_per_queue} bytes of UMEM per queue",
            f"  broker may raise RLIMIT_MEMLOCK: {'yes' if rule.raise_memlock else 'no'}",
        ]
    if allowing:
        lines.append("the first of these that permits a whole request decides it")
    return "\n".join(lines)


def _tenancy(policy: Policy) -> str:
    if policy.exclusive_tenancy:
        return "on (an interface with a live lease is refused to consumers of other uids)"
    return "off (uids may share an interface; see docs/security.md on queue squatting)"


def warnings(policy: Policy) -> list[str]:
    """Valid but likely unmeant: an allow rule without `interfaces` hands out every
    interface, the host's uplink included (the broker refuses only loopback)."""
    return [
        f"warning: {rule.label} covers every interface, the uplink included; name the "
        "interfaces it may hand out (interfaces = [...])"
        for rule in policy.allow
        if EVERYONE in rule.interfaces
    ]


def caller_for_user(user: str) -> Caller:
    """A Caller as the kernel would report a process of user (name or uid) started by login."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise
        return Caller(int(user), int(user), (), 0)
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return Caller(entry.pw_uid, entry.pw_gid, tuple(g for g in groups if g != entry.pw_gid), 0)


class CallerJson(TypedDict):
    uid: int
    gid: int
    groups: list[int]


class ReportJson(TypedDict):
    """`policy check --json`: caller and explanation only with --as."""

    ok: bool
    files: list[str]
    allow_rules: int
    deny_rules: int
    exclusive_tenancy: bool
    warnings: list[str]
    caller: NotRequired[CallerJson]
    explanation: NotRequired[list[str]]


def report(policy: Policy, caller: Caller | None) -> ReportJson:
    """The --json form: the files and rule counts, and for a caller the explanation."""
    body: ReportJson = {
        "ok": True,
        "files": [str(f) for f in policy.files],
        "allow_rules": len(policy.allow),
        "deny_rules": len(policy.deny),
        "exclusive_tenancy": policy.exclusive_tenancy,
        "warnings": warnings(policy),
    }
    if caller is not None:
        body["caller"] = {"uid": caller.uid, "gid": caller.gid, "groups": list(caller.groups)}
        body["explanation"] = explain(policy, caller).splitlines()
    return body


def main(path: Path | str | None, as_user: str | None, *, as_json: bool = False) -> int:
    """Load, then print the verdict; a broken file is one stderr line with its code (exit 1),
    an unknown user a USAGE line (exit 2)."""
    try:
        policy = Policy.load(path or DEFAULT_POLICY_PATH)
    except PolicyError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1
    try:
        caller = None if as_user is None else caller_for_user(as_user)
    except KeyError:
        print(f"{UsageError.code}: no such user: {as_user}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report(policy, caller)))
        return 0
    for warning in warnings(policy):
        print(warning, file=sys.stderr)
    if caller is None:
        files = ", ".join(str(f) for f in policy.files)
        print(
            f"policy OK: {len(policy.allow)} allow and {len(policy.deny)} deny rule(s) in {files}"
            f"; exclusive tenancy {_tenancy(policy)}"
        )
    else:
        print(explain(policy, caller))
    return 0
