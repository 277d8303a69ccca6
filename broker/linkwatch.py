"""Interfaces appearing and disappearing, as rtnetlink events for the server's selector.

Why raw netlink and not pyroute2: the socket-activated broker must give its first reply
within 150 ms, and on this machine (pyroute2 0.9.7, Python 3.11) every import path of
pyroute2 runs its package `__init__`, which pulls in ndb, ipdb, conntrack and asyncio:
`import pyroute2.netlink`, `pyroute2.netlink.rtnl.ifinfmsg`, `pyroute2.netlink.nlsocket` and
`from pyroute2 import IPRoute` all cost 95-130 ms by `-X importtime` (110-160 ms of wall
time against 10-20 ms for `python -c pass`). Watching links needs only nlmsghdr, ifinfomsg
and IFLA_IFNAME, which is about 60 lines of struct; this module imports nothing beyond the
standard library and costs about 2 ms (`-X importtime`, stdlib modules already loaded).

Event kinds (per ifindex, in the watcher's network namespace):
- "added": an RTM_NEWLINK for an ifindex the watcher did not know (it knows every link that
  existed when it was created, from a dump, and every link it has reported since);
- "removed": an RTM_DELLINK for a known ifindex (the device was deleted or moved to another
  namespace); the name is the one last known;
- "renamed": an RTM_NEWLINK for a known ifindex whose name changed.
Other RTM_NEWLINKs (up/down, carrier, MTU, XDP attach) are state changes of a known link and
are not reported. If the kernel drops events because the socket's buffer overflowed
(ENOBUFS), the watcher dumps the links again and reports the difference, so no addition or
removal is ever lost, only collapsed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFLA_IFNAME = 3
RCVBUF_BYTES = 1 << 20

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, port id
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type

Kind = Literal["added", "removed", "renamed"]


@dataclass(frozen=True)
class LinkEvent:
    """One interface appearing, disappearing or being renamed (see the module docstring)."""

    kind: Kind
    ifindex: int
    ifname: str


def _align(length: int) -> int:
    return (length + 3) & ~3


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        yield kind, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def _link(payload: bytes) -> tuple[int, str]:
    """(ifindex, ifname) of an ifinfomsg and its attributes."""
    _family, _type, ifindex, _flags, _change = _IFINFOMSG.unpack_from(payload)
    offset = _IFINFOMSG.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        if kind == IFLA_IFNAME:
            value = payload[offset + _RTATTR.size : offset + length]
            return ifindex, value.split(b"\0", 1)[0].decode(errors="replace")
        offset += _align(length)
    return ifindex, ""


def _netlink_socket() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )


def dump_links() -> dict[int, str]:
    """Every link of the calling thread's network namespace: {ifindex: ifname}."""
    links: dict[int, str] = {}
    with _netlink_socket() as sock:
        sock.bind((0, 0))
        request = _NLMSGHDR.pack(
            _NLMSGHDR.size + _IFINFOMSG.size, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        ) + _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(request)
        while True:
            for kind, payload in _messages(sock.recv(1 << 16)):
                if kind == NLMSG_DONE:
                    return links
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    raise OSError(-code, f"link dump failed: {os.strerror(-code)}")
                if kind == RTM_NEWLINK:
                    ifindex, ifname = _link(payload)
                    links[ifindex] = ifname


class LinkWatch:
    """A non-blocking rtnetlink socket subscribed to RTMGRP_LINK, plus the links it knows.

    Created in the network namespace of the calling thread (the broker's). Register
    fileno() for reading in a selector and call drain() when it is readable; drain() never
    blocks. `links` is the current {ifindex: ifname} as far as the events drained so far say;
    `overflows` counts the times events were lost and the links dumped again instead.
    """

    def __init__(self) -> None:
        self.overflows = 0
        self._sock = _netlink_socket()
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            # Subscribe before the dump, so a link made in between is in one or the other.
            self._sock.bind((0, RTMGRP_LINK))
            self._sock.setblocking(False)
            self.links = dump_links()
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[LinkEvent]:
        """Every event queued now, in order; [] when nothing happened."""
        events: list[LinkEvent] = []
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                events.extend(self._resync())
                continue
            for kind, payload in _messages(data):
                event = self._event(kind, payload)
                if event is not None:
                    events.append(event)

    def _event(self, kind: int, payload: bytes) -> LinkEvent | None:
        if kind not in (RTM_NEWLINK, RTM_DELLINK):
            return None
        ifindex, ifname = _link(payload)
        if kind == RTM_DELLINK:
            known = self.links.pop(ifindex, None)
            return None if known is None else LinkEvent("removed", ifindex, known)
        previous = self.links.get(ifindex)
        self.links[ifindex] = ifname
        if previous is None:
            return LinkEvent("added", ifindex, ifname)
        if previous != ifname:
            return LinkEvent("renamed", ifindex, ifname)
        return None

    def _resync(self) -> list[LinkEvent]:
        """After an overflow lost events: drop what is queued (it is stale and incomplete),
        then report the difference between the links known and a fresh dump."""
        while True:
            try:
                self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
        now = dump_links()
        events = [
            LinkEvent("removed", ifindex, ifname)
            for ifindex, ifname in self.links.items()
            if ifindex not in now
        ]
        for ifindex, ifname in now.items():
            previous = self.links.get(ifindex)
            if previous is None:
                events.append(LinkEvent("added", ifindex, ifname))
            elif previous != ifname:
                events.append(LinkEvent("renamed", ifindex, ifname))
        self.links = now
        return events

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> LinkWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
