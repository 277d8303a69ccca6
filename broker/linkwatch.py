"""Interfaces appearing and disappearing, as rtnetlink events for the server's selector.

Raw rtnetlink (the codec is in broker.netdev) rather than pyroute2, whose import costs
95-130 ms and 13.5 MiB (see broker.netdev): a socket-activated broker creates this watch
before its first reply.

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
import socket
from typing import Literal, NamedTuple

from broker.netdev import (
    IFLA_IFNAME,
    RECV_BYTES,
    RTM_DELLINK,
    RTM_NEWLINK,
    dump_links,
    link_attributes,
    messages,
    netlink_socket,
    text,
)

RTMGRP_LINK = 1
RCVBUF_BYTES = 1 << 20

Kind = Literal["added", "removed", "renamed"]


class LinkEvent(NamedTuple):
    """One interface appearing, disappearing or being renamed (see the module docstring)."""

    kind: Kind
    ifindex: int
    ifname: str


class LinkWatch:
    """A non-blocking rtnetlink socket subscribed to RTMGRP_LINK, plus the links it knows.

    Created in the network namespace of the calling thread (the broker's). Register
    fileno() for reading in a selector and call drain() when it is readable; drain() never
    blocks. `links` is the current {ifindex: ifname} as far as the events drained so far say;
    `overflows` counts the times events were lost and the links dumped again instead.
    """

    def __init__(self) -> None:
        self.overflows = 0
        self._sock = netlink_socket()
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
                data = self._sock.recv(RECV_BYTES)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                events.extend(self._resync())
                continue
            for kind, payload in messages(data):
                event = self._event(kind, payload)
                if event is not None:
                    events.append(event)

    def _event(self, kind: int, payload: bytes) -> LinkEvent | None:
        if kind not in (RTM_NEWLINK, RTM_DELLINK):
            return None
        ifindex, attrs = link_attributes(payload)
        ifname = text(attrs.get(IFLA_IFNAME))
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
                self._sock.recv(RECV_BYTES)
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
