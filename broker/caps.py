"""Check and drop the broker's capabilities at start.

The broker needs CAP_NET_ADMIN, CAP_BPF and CAP_NET_RAW and nothing else; anything more it
holds is only a liability if a request ever reaches a bug. So at start it checks the three
are there (failing closed with one line that says which unit setting fixes it), then drops
everything else from every set and sets no_new_privs, before it reads a single request.
Capability names are python-prctl's: lower case without the "cap_" prefix.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

import prctl

from broker.errors import Failed, Refused

REQUIRED = ("net_admin", "bpf", "net_raw")
# Kept only when present: raising a consumer's RLIMIT_MEMLOCK needs it (policy's choice).
OPTIONAL = ("sys_resource",)
# Kept when `serve --map-pins` asks for it: giving a map lease's pin to its consumer uid.
MAP_PINS = ("chown",)
SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

# Capabilities newer than python-prctl's table (it names bit 40 "last_cap").
_NEWER_NAMES = {40: "checkpoint_restore"}
_NAMES: dict[int, str] = {
    getattr(prctl, f"CAP_{name.upper()}"): name
    for name in prctl.ALL_CAP_NAMES
    if name != "last_cap" and not name.startswith("unknown_")
} | _NEWER_NAMES


class MissingCapabilities(Failed):
    """The broker was started without a capability it cannot work without."""

    code = "MISSING_CAPABILITIES"
    default_errno = errno.EPERM


class RootRefused(Refused):
    """The broker was started as root with capabilities it must not hold."""

    code = "ROOT_REFUSED"
    default_errno = errno.EPERM


def cap_name(number: int) -> str:
    """The python-prctl style name of a capability bit."""
    return _NAMES.get(number, f"cap_{number}")


def unit_name(name: str) -> str:
    """How a systemd unit spells a capability (CAP_NET_ADMIN)."""
    return f"CAP_{name.upper()}"


def parse_status(text: str) -> dict[str, frozenset[str]]:
    """The capability sets (CapInh, CapPrm, ...) in the text of a /proc/PID/status file."""
    sets = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in SETS:
            mask = int(value, 16)
            sets[key] = frozenset(cap_name(n) for n in range(mask.bit_length()) if mask >> n & 1)
    return sets


def current(status: Path = Path("/proc/self/status")) -> dict[str, frozenset[str]]:
    """Each capability set of a process as a set of names.

    Read from /proc rather than libcap so the answer is what the kernel enforces, and so the
    same function can inspect another process (tests, `doctor`).
    """
    return parse_status(status.read_text())


def check_required(required: Iterable[str] = REQUIRED) -> None:
    """Raise MissingCapabilities naming every required capability not permitted."""
    missing = [name for name in required if name not in current()["CapPrm"]]
    if missing:
        spelled = " ".join(unit_name(name) for name in missing)
        raise MissingCapabilities(
            f"missing capabilities {spelled}: add them to AmbientCapabilities= and "
            f"CapabilityBoundingSet= of xsk-broker.service "
            f"(by hand: setpriv --inh-caps/--ambient-caps, or run as root with --allow-root)"
        )


def refuse_full_root(allow_root: bool, keep: Iterable[str] = REQUIRED + OPTIONAL) -> None:
    """Refuse uid 0 holding capabilities beyond keep, unless allow_root.

    Root with every capability is what `sudo xsk-broker serve` gives; it works, but it throws
    away the service's confinement, so it must be asked for. Allowed or not, the caller still
    calls drop_to_minimum().
    """
    if allow_root or 0 not in os.getresuid():
        return
    extra = sorted(current()["CapEff"] - set(keep))
    if extra:
        raise RootRefused(
            f"running as root with {len(extra)} capabilities the broker does not need: "
            f"start xsk-broker.service, "
            f"which runs as user xsk-broker, or pass --allow-root to drop them and go on"
        )


def drop_to_minimum(keep: Iterable[str] = REQUIRED + OPTIONAL) -> dict[str, frozenset[str]]:
    """Keep only those of keep that are permitted now, in every set; set no_new_privs.

    The bounding set can only shrink while CAP_SETPCAP is effective (root, or a unit that
    grants it); without it the extras stay in the bounding set but are unreachable: with
    no_new_privs no exec can gain them and nothing outside permitted can be raised. Returns
    the sets afterwards, and raises OSError if anything beyond keep is still held.
    """
    before = current()
    kept = frozenset(keep) & before["CapPrm"]
    numbers = {name: number for number, name in _NAMES.items()}
    prctl.set_no_new_privs(1)
    if "setpcap" in before["CapEff"]:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for number in range(last + 1):
            if cap_name(number) not in kept and prctl.capbset_read(number):
                prctl.capbset_drop(number)
    # The kernel clears from the ambient set whatever leaves permitted or inheritable.
    drop = [numbers[name] for name in numbers if name not in kept]
    prctl.set_caps(
        (drop, prctl.CAP_EFFECTIVE, False),
        (drop, prctl.CAP_PERMITTED, False),
        (drop, prctl.CAP_INHERITABLE, False),
        ([numbers[name] for name in kept], prctl.CAP_EFFECTIVE, True),
    )
    after = current()
    left = {key: sorted(after[key] - kept) for key in SETS if key != "CapBnd"}
    if any(left.values()) or not prctl.get_no_new_privs():
        raise OSError(errno.EPERM, f"capabilities left after dropping: {left}")
    return after


def check_start(allow_root: bool, keep: Iterable[str] = REQUIRED + OPTIONAL) -> None:
    """The refusals of enter_least_privilege alone, which `serve` makes before it creates
    anything: RootRefused or MissingCapabilities."""
    refuse_full_root(allow_root, keep)
    check_required()


def enter_least_privilege(
    allow_root: bool, keep: Iterable[str] = REQUIRED + OPTIONAL
) -> dict[str, frozenset[str]]:
    """What `serve` calls first: refuse plain root, check what is needed, drop the rest.

    One call so the order (check before drop, drop before any request) cannot be got wrong.
    Raises RootRefused or MissingCapabilities; returns the sets afterwards.
    """
    check_start(allow_root, keep)
    return drop_to_minimum(keep)
