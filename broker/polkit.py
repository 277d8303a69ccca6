"""Ask polkitd whether a caller may have sockets, when a policy rule delegates to it.

Spoken over the system D-Bus with jeepney: pure Python with no C library and no GLib main
loop to drive, so the broker stays importable without PyGObject or dbus-python, and a check
is one blocking round trip with a deadline that fits the server's own loop (or a thread).

The subject is a unix-process named by pid, start time and uid. polkitd compares the start
time with /proc/PID/stat and refuses ("process with PID N has been replaced") when they
differ, so a recycled pid cannot borrow another process's authorization. The start time is
read with the caller's pidfd held, which proves it was read from the caller itself. Polkit
122 (Debian 12) does not accept a pidfd in the subject itself. The uid comes from
SO_PEERCRED: passing it keeps polkitd from reading a uid the process may have changed since.

No interactive authentication is ever requested (flags 0): a rule must say yes outright.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from broker import procinfo
from broker.errors import Denied
from broker.protocol import Request

BUS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"
DEFAULT_BUS = "unix:path=/run/dbus/system_bus_socket"
DEFAULT_TIMEOUT = 5.0
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY_NAME = "org.freedesktop.PolicyKit1"
AUTHORITY_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
# D-Bus errors that mean "nobody answers for polkit", as opposed to polkitd refusing.
_UNREACHABLE = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
)


@dataclass(frozen=True)
class Subject:
    """A process as polkit identifies it: pid plus start time (pid reuse), plus uid."""

    pid: int
    start_time: int
    uid: int


@dataclass(frozen=True)
class Granted:
    """polkitd said yes; details are what it returned (rules may add to them)."""

    action_id: str
    details: dict[str, str]


def subject_of(pid: int, uid: int, pidfd: int | None = None) -> Subject:
    """The polkit subject for the peer (pid, uid from SO_PEERCRED, pidfd from SO_PEERPIDFD)."""
    return Subject(pid, procinfo.start_time(pid, pidfd), uid)


def request_details(request: Request, consumer_pid: int, consumer_uid: int) -> dict[str, str]:
    """What polkit rules can read with action.lookup(KEY) for a socket request."""
    details = {
        "interface": request.ifname,
        "start_queue": str(request.start_queue),
        "queues": str(request.queues),
        "queue_ids": ",".join(
            str(q) for q in range(request.start_queue, request.start_queue + request.queues)
        ),
        "mode": request.mode,
        "umem_bytes": str(request.umem_bytes),
        "consumer_pid": str(consumer_pid),
        "consumer_uid": str(consumer_uid),
    }
    if request.tag is not None:
        details["tag"] = request.tag
    return details


def check(
    subject: Subject,
    action_id: str,
    details: Mapping[str, str],
    *,
    bus_address: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Granted:
    """CheckAuthorization(subject, action_id, details); Granted, or Denied saying why not.

    bus_address defaults to $DBUS_SYSTEM_BUS_ADDRESS, then the standard system bus.
    An unreachable bus or polkitd is a denial too: without an answer there are no sockets.
    """
    # jeepney only here: most brokers never ask polkit, and its import costs ~5 ms at start.
    from jeepney import DBusAddress, DBusErrorResponse, MessageType, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    address = bus_address or os.environ.get(BUS_ENV) or DEFAULT_BUS
    authority = DBusAddress(AUTHORITY_PATH, bus_name=AUTHORITY_NAME, interface=AUTHORITY_INTERFACE)
    message = new_method_call(
        authority,
        "CheckAuthorization",
        "(sa{sv})sa{ss}us",
        (
            (
                "unix-process",
                {
                    "pid": ("u", subject.pid),
                    "start-time": ("t", subject.start_time),
                    "uid": ("i", subject.uid),
                },
            ),
            action_id,
            dict(details),
            0,
            "",
        ),
    )
    try:
        with open_dbus_connection(address, auth_timeout=timeout) as conn:
            reply = conn.send_and_get_reply(message, timeout=timeout)
    except (OSError, TimeoutError, ValueError, RuntimeError) as exc:
        raise Denied(f"polkit is unreachable: system bus {address}: {exc}") from None
    if reply.header.message_type == MessageType.error:
        error = DBusErrorResponse(reply)
        text = " ".join(str(part) for part in error.data) or error.name
        if error.name in _UNREACHABLE:
            raise Denied(f"polkit is unreachable: {error.name}: {text}")
        raise Denied(f"polkit could not check {action_id} for pid {subject.pid}: {text}")
    # CheckAuthorization returns one AuthorizationResult (bba{ss}); jeepney is untyped.
    result: tuple[bool, bool, dict[str, str]] = reply.body[0]
    authorized, challenge, result_details = result
    if authorized:
        return Granted(action_id, dict(result_details))
    if challenge:
        raise Denied(
            f"polkit would grant {action_id} to pid {subject.pid} (uid {subject.uid}) only "
            "after interactive authentication, which xsk-broker never asks for: add a polkit "
            "rule that returns polkit.Result.YES"
        )
    raise Denied(f"polkit denies {action_id} to pid {subject.pid} (uid {subject.uid})")
