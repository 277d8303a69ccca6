"""The event loop: one thread, one selector; connections, limits, fd passing, polkit parking.

Non-blocking SOCK_SEQPACKET connections (a datagram is whole or absent, so no client can
stall another), each closed after connection_deadline silent seconds. What a message means
is jsonfront.py's business, what it does core.py's; this only moves bytes, fds and events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker import fdguard, fdpass
from broker.config import ServeConfig
from broker.core import Service
from broker.errors import BrokerError, RateLimited, TooManyConnections
from broker.frontend import Answer, FrontEnd, Waiting
from broker.limits import UidLimits
from broker.linkwatch import LinkWatch
from broker.peer import peer_of
from broker.policy import Caller

if TYPE_CHECKING:  # imported when a check is first parked: jeepney and threads cost ~20 ms
    from concurrent.futures import Future, ThreadPoolExecutor

    from broker import polkit

log = logging.getLogger("xsk-broker")


@dataclass
class Connection:
    sock: socket.socket
    peer: Caller
    deadline: float
    front: FrontEnd
    listener: int  # the fd of the listening socket it came from
    sealed: bool  # no fd of the client's can be queued on it: close it on the loop
    parked: bool = False


@dataclass
class Parked:
    """A connection whose answer waits for polkit in a worker thread."""

    conn: Connection
    waiting: Waiting
    future: Future[polkit.Granted]


@dataclass(frozen=True)
class PidfdWatch:
    """core.PidfdWatch on the server's selector: a consumer's pidfd turns readable when it
    exits."""

    selector: selectors.BaseSelector

    def watch(self, pidfd: int) -> None:
        self.selector.register(pidfd, selectors.EVENT_READ, "pidfd")

    def unwatch(self, pidfd: int) -> None:
        self.selector.unregister(pidfd)


class Server:
    """Serves front ends on listening sockets (the main one, and those serve() adds, such as
    a map lease's device-plugin socket); the core's pidfds and link events too."""

    def __init__(
        self,
        config: ServeConfig,
        listener: socket.socket,
        front: FrontEnd,
        service: Service,
        selector: selectors.BaseSelector,
    ) -> None:
        self.config = config
        self.service = service
        self.selector = selector
        self.connections: dict[int, Connection] = {}
        self.listeners: dict[int, tuple[socket.socket, FrontEnd]] = {}
        self.parked: list[Parked] = []
        self.executor: ThreadPoolExecutor | None = None
        self.limits = UidLimits(
            config.max_connections,
            config.max_connections_per_uid,
            config.rate_per_uid,
            config.burst,
        )
        self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.signals, self.signals_w = socket.socketpair()
        for end in (self.signals, self.signals_w):
            end.setblocking(False)
        self.linkwatch = LinkWatch()
        self.closer = fdguard.Closer()
        self.refuses_rights = not config.without_passrights
        self.running = True
        self.last_activity = time.monotonic()
        for source, what in (
            (self.linkwatch, "links"),
            (self.wakeup, "decided"),
            (self.signals, "signal"),
        ):
            self.selector.register(source, selectors.EVENT_READ, what)
        self.serve(listener, front)

    def serve(self, listener: socket.socket, front: FrontEnd) -> None:
        """Accept connections on listener too, and let front answer them."""
        if self.refuses_rights and not fdguard.refuse_rights(listener):
            self.refuses_rights = False
            log.warning("the kernel lacks SO_PASSRIGHTS: client fds reach the broker and "
                        "are closed by a thread of their own")  # fmt: skip
        listener.setblocking(False)
        self.listeners[listener.fileno()] = (listener, front)
        self.selector.register(listener, selectors.EVENT_READ, "listen")

    def unserve(self, listener: socket.socket) -> None:
        """Stop serving listener: its connections are dropped and it is closed."""
        fd = listener.fileno()
        if self.listeners.pop(fd, None) is not None:
            self.selector.unregister(listener)
        for conn_fd in [c for c, conn in self.connections.items() if conn.listener == fd]:
            self._drop(conn_fd)
        self._close(listener, self.refuses_rights)  # its backlog may hold a client's fds

    def catch_signals(self) -> None:
        """SIGTERM/SIGINT stop and SIGHUP reloads, acted on by the loop between events (a
        handler could interrupt a lease half-recorded); the wakeup fd wakes the selector."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda _signum, _frame: None)
        signal.set_wakeup_fd(self.signals_w.fileno(), warn_on_full_buffer=False)

    def step(self, timeout: float | None) -> None:
        """One round of the loop; no single event, whatever it raises, ends the broker."""
        for key, _ in self.selector.select(timeout):
            try:
                self._event(key.data, key.fd)
            except Exception:
                log.exception("handling a %s event failed", key.data)
                if key.data == "conn":
                    self._drop(key.fd)
        now = time.monotonic()
        for fd in [fd for fd, conn in self.connections.items() if conn.deadline <= now]:
            self._drop(fd)

    def _event(self, what: str, fd: int) -> None:
        if what == "conn":
            self._readable(self.connections[fd])
        elif what == "listen":
            self._accept(*self.listeners[fd])
        elif what == "pidfd":
            self.service.consumer_exited(fd)
        elif what == "links":
            for event in self.linkwatch.drain():
                if event.kind == "removed":
                    self.service.link_removed(event.ifindex, event.ifname)
                elif event.kind == "renamed":
                    self.service.link_renamed(event.ifindex, event.ifname)
        elif what == "decided":
            self._polkit_answered()
        else:
            self._signalled()

    def _signalled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for signum in self.signals.recv(512):
                if signum == signal.SIGHUP:
                    self.service.reload_policy()
                else:
                    log.info("signal %d: stopping", signum)
                    self.running = False

    def close(self) -> None:
        for fd in list(self.connections):
            self._drop(fd)
        self.selector.close()
        self.linkwatch.close()
        if self.executor is not None:  # a running check ends within polkit_timeout
            self.executor.shutdown(wait=True, cancel_futures=True)
        for parked in self.parked:
            parked.waiting.check.abandon()
        os.close(self.wakeup)
        for end in (self.signals, self.signals_w):
            end.close()

    def next_timeout(self) -> float | None:
        now = time.monotonic()
        waits = [conn.deadline - now for conn in self.connections.values()]
        if self.config.idle_exit is not None:
            waits.append(self.last_activity + self.config.idle_exit - now)
        return max(0.0, min(waits)) if waits else None

    def idle_expired(self) -> bool:
        idle, since = self.config.idle_exit, time.monotonic() - self.last_activity
        return idle is not None and not self.connections and since >= idle

    def _accept(self, listener: socket.socket, front: FrontEnd) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.last_activity = time.monotonic()
        try:
            peer = peer_of(sock)
        except OSError:
            self._close(sock, sealed=False)
            return
        sealed = self.refuses_rights and fdguard.sealed(sock)
        crowded = self.limits.crowding(peer.uid)
        if crowded is not None:
            self._evict(crowded)
        refusal = self.limits.refuse_connection(peer.uid)
        if refusal is not None:
            os.close(peer.pidfd)
            with contextlib.suppress(OSError):
                fdpass.send(sock, front.refuse(refusal).data)
            self._close(sock, sealed)
            return
        self.limits.connected(peer.uid)
        sock.setblocking(False)
        deadline = self.last_activity + self.config.connection_deadline
        self.connections[sock.fileno()] = Connection(
            sock, peer, deadline, front, listener.fileno(), sealed
        )
        self.selector.register(sock, selectors.EVENT_READ, "conn")

    def _drop(self, fd: int) -> None:
        conn = self.connections.pop(fd, None)
        if conn is not None:
            self.limits.disconnected(conn.peer.uid)
            if not conn.parked:
                self.selector.unregister(conn.sock)
            self._close(conn.sock, conn.sealed)
            os.close(conn.peer.pidfd)

    def _evict(self, uid: int) -> None:
        """Close uid's connection silent the longest (one waiting for polkit is busy, not
        idle), telling its client why."""
        idle = [
            conn for conn in self.connections.values() if conn.peer.uid == uid and not conn.parked
        ]
        if not idle:
            return
        conn = min(idle, key=lambda c: c.deadline)
        fd, held = conn.sock.fileno(), self.limits.connections[uid]
        self._reply(conn, conn.front.refuse(TooManyConnections(
            f"closed to make room: the broker is full and uid {uid} holds the most "
            f"connections ({held}); close idle ones"
        )))  # fmt: skip
        log.info("evicted an idle connection of uid %d (%d open) to make room", uid, held)
        self._drop(fd)

    def _close(self, sock: socket.socket, sealed: bool) -> None:
        """Close a connection; one that may still hold a client's fd, off the loop."""
        if sealed:
            sock.close()
        else:
            self.closer.close_socket(sock)

    def _readable(self, conn: Connection) -> None:
        self.last_activity = time.monotonic()
        conn.deadline = self.last_activity + self.config.connection_deadline
        refusal = self.limits.refuse_message(conn.peer.uid)
        if refusal is not None:
            with contextlib.suppress(OSError):
                self.closer.close_fds(fdpass.receive(conn.sock, fdpass.SCM_MAX_FD).fds)
            self._reply(conn, conn.front.refuse(refusal))
            self._drop(conn.sock.fileno())
            return
        try:
            data = fdpass.receive_request(conn.sock, self.closer.close_fds)
        except BrokerError as error:
            self._reply(conn, conn.front.refuse(error))
            return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn.sock.fileno())
            return
        if not data:
            self._drop(conn.sock.fileno())
            return
        answer = conn.front.handle(conn.peer, data)
        now = self._park(conn, answer) if isinstance(answer, Waiting) else answer
        if now is not None:
            self._reply(conn, now)

    def _reply(self, conn: Connection, answer: Answer) -> None:
        """Send, then close the broker's copies; a lease whose fds never arrived ends."""
        try:
            fdpass.send(conn.sock, answer.data, list(answer.fds))
        except OSError:
            self._drop(conn.sock.fileno())
            if answer.lease_id is not None:
                self.service.undelivered(answer.lease_id)
        finally:
            fdpass.close_all(list(answer.fds))

    def _park(self, conn: Connection, waiting: Waiting) -> Answer | None:
        """Ask polkit in a worker thread (a D-Bus round trip that may take seconds) while the
        loop serves everyone else; the connection reads nothing meanwhile. Checks waiting
        are bounded per uid and overall, so one uid cannot make everyone else's wait out
        their deadlines."""
        from broker import polkit

        uid = conn.peer.uid
        mine = sum(1 for p in self.parked if p.conn.peer.uid == uid)
        try:
            if mine >= self.config.max_polkit_checks_per_uid:
                raise RateLimited(f"uid {uid} already has {mine} polkit checks waiting")
            if len(self.parked) >= self.config.max_polkit_checks:
                raise RateLimited(f"{len(self.parked)} polkit checks are waiting; retry later")
            subject = polkit.subject_of(conn.peer.pid, uid, conn.peer.pidfd)
            if self.executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="polkit")
            future = self.executor.submit(
                polkit.check, subject, waiting.check.action, waiting.check.details,
                timeout=self.config.polkit_timeout,
            )  # fmt: skip
        except BrokerError as error:
            return waiting.finish(error)
        except Exception as exc:  # e.g. /proc unreadable, no thread: the answer is INTERNAL
            log.exception("cannot ask polkit")
            return waiting.finish(BrokerError(f"internal error: cannot ask polkit: {exc}"))
        self.selector.unregister(conn.sock)
        conn.parked = True
        self.parked.append(Parked(conn, waiting, future))
        future.add_done_callback(lambda _: os.eventfd_write(self.wakeup, 1))
        return None

    def _polkit_answered(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wakeup)
        for parked in [p for p in self.parked if p.future.done()]:
            self.parked.remove(parked)
            conn = parked.conn
            if self.connections.get(conn.sock.fileno()) is not conn:
                log.info("uid %d went away during its polkit check", conn.peer.uid)
                parked.waiting.check.abandon()
                continue
            answer = parked.waiting.finish(parked.future.exception())
            conn.parked = False
            self.selector.register(conn.sock, selectors.EVENT_READ, "conn")
            self._reply(conn, answer)
