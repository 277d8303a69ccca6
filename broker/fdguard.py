"""A client's file descriptors must cost the loop nothing.

A received fd can be a trap: the last close of a TCP socket with unsent data and a long
SO_LINGER blocks the closing thread for as long as its owner keeps the other end unread.
The same happens when a connection is closed with such an fd still queued on it (the
kernel releases the fd in the thread that closes the connection), and when recvmsg has no
room for every fd (the kernel drops the rest in the receiving thread).

Linux 6.16+ refuses them at the sender: with SO_PASSRIGHTS=0 on a unix socket (accepted
connections inherit it from their listener when the peer connects), the peer's sendmsg
with SCM_RIGHTS fails with EPERM and nothing reaches the broker. Where the kernel lacks
the option, and for connections made before it was set, whatever may hold a client's fd
is closed by Closer's threads, never by the loop.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import threading

SO_PASSRIGHTS = 83  # <asm-generic/socket.h>, Linux 6.16+ (the same value on every arch)

log = logging.getLogger("xsk-broker")


def refuse_rights(sock: socket.socket) -> bool:
    """Set SO_PASSRIGHTS=0 on sock; False where the kernel lacks it (before 6.16)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
        return False
    return True


def sealed(conn: socket.socket) -> bool:
    """Whether no fd can ever have been queued on an accepted connection: it was made while
    its listener refused rights. One made before (a socket-activation backlog) is sealed
    from now on, but may already hold fds: False."""
    if conn.getsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS) == 0:
        return True
    refuse_rights(conn)
    return False


class Closer:
    """Closes fds and connections that may hold a client's fd, on threads of its own.

    A few daemon threads, started as needed: a trap blocks one of them until its owner
    gives up, while the others carry on; the loop only ever queues. Daemon threads, so a
    blocked close cannot hold up the broker's exit.
    """

    def __init__(self, threads: int = 4) -> None:
        self._queue: queue.SimpleQueue[int | socket.socket] = queue.SimpleQueue()
        self._max_threads = threads
        self._threads = 0

    def close_fds(self, fds: list[int]) -> None:
        for fd in fds:
            self._put(fd)

    def close_socket(self, sock: socket.socket) -> None:
        self._put(sock)

    def _put(self, item: int | socket.socket) -> None:
        self._queue.put(item)
        if self._threads < self._max_threads:
            self._threads += 1
            threading.Thread(target=self._run, name="fd-closer", daemon=True).start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if isinstance(item, socket.socket):
                    item.close()
                else:
                    os.close(item)
            except OSError as exc:
                log.warning("closing a client's fd failed: %s", exc)
