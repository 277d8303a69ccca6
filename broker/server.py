"""The accept loop: one thread, one selector, every step of a request a plain function call.

Connections are non-blocking SOCK_SEQPACKET sockets: a datagram is there whole or not at
all, so a slow or hostile client can never stall another. A connection may carry many
exchanges; it is closed after connection_deadline seconds without a message.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from broker import fdpass, memlock, netdev, polkit, procinfo, xsk
from broker.activation import Notifier, log_event
from broker.leases import Lease, LeaseTable, new_lease_id
from broker.limits import UidLimits
from broker.linkwatch import LinkWatch
from broker.loader import DEFAULT_PIN_ROOT, Attachment, Loader
from broker.policy import DEFAULT_POLICY_PATH, Caller, Grant, Policy, PolicyError
from broker.protocol import (
    BrokerError,
    ConsumerGone,
    Denied,
    Detach,
    LeaseInfo,
    LeasesLive,
    Message,
    NoSuchLease,
    Ping,
    QueueBusy,
    RateLimited,
    Release,
    Request,
    Revoke,
    StatusQuery,
    TooManyConnections,
    decode_message,
    encode_error,
    encode_reply,
    netdev_template,
)

log = logging.getLogger("xsk-broker")
# Lease pidfds parked in systemd's fd store survive a restart of the service.
FDSTORE_PREFIX = "lease-"
SO_PEERGROUPS = 59
SO_PEERPIDFD = 77
VERSION = "0.1.0"


@dataclass(frozen=True)
class ServeConfig:
    """Everything `serve` is told, parsed once and passed down."""

    socket_path: Path
    pin_root: Path = DEFAULT_PIN_ROOT
    state_dir: Path | None = Path("/run/xsk-broker")
    idle_exit: float | None = None
    max_connections: int = 1024
    max_connections_per_uid: int = 128
    rate_per_uid: float = 200.0
    burst_per_uid: float = 400.0
    connection_deadline: float = 10.0
    max_polkit_checks_per_uid: int = 2
    max_polkit_checks: int = 32
    max_status_leases: int = 200
    policy_path: Path = DEFAULT_POLICY_PATH
    polkit_timeout: float = 5.0


def peer_of(conn: socket.socket) -> tuple[Caller, int]:
    """Who is on the other end, as the kernel says (never the message), and a pidfd on it
    (SO_PEERPIDFD, Linux 6.5+)."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
    except OSError as exc:  # ERANGE: more than 256 groups; NGROUPS_MAX is 65536
        if exc.errno != errno.ERANGE:
            raise
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 65536)
    groups = struct.unpack(f"{len(raw) // 4}I", raw)
    pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    return Caller(uid, gid, groups, pid), pidfd


def load_policy(path: Path) -> Policy:
    """The policy at path; a missing file is a policy with no rules (deny by default), and a
    broken one raises PolicyError."""
    if not path.exists():
        log.warning("no policy file at %s: every request will be denied", path)
        return Policy(path, (), (), ())
    return Policy.load(path)


@dataclass
class Connection:
    sock: socket.socket
    peer: Caller
    pidfd: int
    deadline: float
    parked: bool = False


@dataclass(frozen=True)
class Consumer:
    """The process the sockets are for: its lease ends when it exits."""

    pid: int
    uid: int
    pidfd: int


class Reply(NamedTuple):
    """What goes back on a connection; lease_id names a lease whose fds these are, to be
    ended if they cannot be delivered."""

    data: bytes
    fds: Sequence[int] = ()
    lease_id: str | None = None


@dataclass
class Pending:
    """A decision waiting for polkit in a worker thread, its connection parked meanwhile."""

    conn: Connection
    message: Message
    future: Future
    then: Callable[[], Reply]
    cleanup: Callable[[], None]


@dataclass
class Broker:
    """The daemon's state: attachments, leases, open connections."""

    config: ServeConfig
    listener: socket.socket
    loader: Loader = field(init=False)
    leases: LeaseTable = field(init=False)
    notifier: Notifier = field(default_factory=Notifier)
    stored_fds: dict[str, int] = field(default_factory=dict)
    connections: dict[int, Connection] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.policy = load_policy(self.config.policy_path)
        self.pending: list[Pending] = []
        self.executor: ThreadPoolExecutor | None = None
        self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.signals, self.signals_w = socket.socketpair()
        for end in (self.signals, self.signals_w):
            end.setblocking(False)
        self.limits = UidLimits(
            self.config.max_connections_per_uid,
            self.config.rate_per_uid,
            self.config.burst_per_uid,
        )
        self.loader = Loader(self.config.pin_root)
        self.leases = LeaseTable(self.config.state_dir)
        self.selector = selectors.DefaultSelector()
        self.running = True
        self.last_activity = time.monotonic()
        self.linkwatch: LinkWatch | None = None

    def start(self) -> None:
        """Adopt pinned attachments and the previous broker's leases before serving."""
        if self.config.state_dir is not None:
            self.config.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        for attachment in self.loader.adopt_all():
            log.info("adopted %s", attachment.describe())
        pidfds = {n.removeprefix(FDSTORE_PREFIX): fd for n, fd in self.stored_fds.items()}
        for info in self.leases.restore(pidfds):
            self._release_slots(info)
            self._audit("expired", info, "consumer exited while the broker was down")
        for name in set(self.stored_fds) - {FDSTORE_PREFIX + i for i in self.leases.by_id}:
            self.notifier.remove_fds(name)
        for lease in list(self.leases.by_id.values()):
            self.selector.register(lease.pidfd, selectors.EVENT_READ, "pidfd")
            name = FDSTORE_PREFIX + lease.info.lease_id
            if name not in self.stored_fds:  # found again by pid: park the new pidfd too
                self.notifier.store_fds(name, [lease.pidfd])
            if lease.info.ifindex not in self.loader.attachments:
                self._end_lease(
                    lease, "expired", "its interface vanished while the broker was down"
                )
        self.linkwatch = LinkWatch()
        self.selector.register(self.linkwatch, selectors.EVENT_READ, "links")
        self.selector.register(self.wakeup, selectors.EVENT_READ, "pending")
        self.selector.register(self.signals, selectors.EVENT_READ, "signal")
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "listen")
        self._changed()

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
                self._event(key)
            except Exception:
                log.exception("handling a %s event failed", key.data)
                if key.data == "conn":
                    self._drop(key.fd)
        self._expire_connections()

    def _event(self, key: selectors.SelectorKey) -> None:
        if key.data == "listen":
            self._accept()
        elif key.data == "pidfd":
            self._consumer_exited(key.fd)
        elif key.data == "links":
            self._links_changed()
        elif key.data == "pending":
            self._decided()
        elif key.data == "signal":
            self._signalled()
        else:
            self._readable(key.fd)

    def _signalled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for signum in self.signals.recv(512):
                if signum == signal.SIGHUP:
                    self.reload_policy()
                else:
                    log.info("signal %d: stopping", signum)
                    self.running = False

    def close(self) -> None:
        for fd in list(self.connections):
            self._drop(fd)
        self.leases.close()
        self.loader.close()
        self.selector.close()
        if self.linkwatch is not None:
            self.linkwatch.close()
        if self.executor is not None:  # a running check ends within polkit_timeout
            self.executor.shutdown(wait=True, cancel_futures=True)
        for pending in self.pending:
            pending.cleanup()
        os.close(self.wakeup)
        self.signals.close()
        self.signals_w.close()

    def reload_policy(self) -> None:
        """SIGHUP: use the new policy only if it loads whole; leases are never touched."""
        try:
            policy = load_policy(self.config.policy_path)
        except PolicyError as error:
            log_event(
                log,
                f"policy reload refused, the old policy stays: {error.message}",
                logging.ERROR,
                event="policy",
                reason=error.message,
            )
            return
        self.policy = policy
        log_event(
            log,
            f"policy reloaded from {policy.path}",
            event="policy",
            reason=f"{len(policy.allow)} allow, {len(policy.deny)} deny rule(s)",
        )

    def next_timeout(self) -> float | None:
        now = time.monotonic()
        waits = [conn.deadline - now for conn in self.connections.values()]
        if self.config.idle_exit is not None:
            waits.append(self.last_activity + self.config.idle_exit - now)
        return max(0.0, min(waits)) if waits else None

    def idle_expired(self) -> bool:
        idle = self.config.idle_exit
        return (
            idle is not None
            and not self.connections
            and time.monotonic() - self.last_activity >= idle
        )

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.last_activity = time.monotonic()
        try:
            peer, pidfd = peer_of(sock)
        except OSError:
            sock.close()
            return
        refusal = self._connection_refusal(peer)
        if refusal is not None:
            os.close(pidfd)
            with sock, contextlib.suppress(OSError):
                fdpass.send(sock, encode_error(refusal))
            return
        self.limits.connected(peer.uid)
        sock.setblocking(False)
        deadline = time.monotonic() + self.config.connection_deadline
        self.connections[sock.fileno()] = Connection(sock, peer, pidfd, deadline)
        self.selector.register(sock, selectors.EVENT_READ, "conn")

    def _connection_refusal(self, peer: Caller) -> BrokerError | None:
        """Caps on open connections, overall and per uid, so idle hoarders cannot lock
        everyone else out."""
        if len(self.connections) >= self.config.max_connections:
            return TooManyConnections(
                f"the broker holds {len(self.connections)} connections; retry later"
            )
        if not self.limits.may_connect(peer.uid):
            return TooManyConnections(
                f"uid {peer.uid} already has {self.config.max_connections_per_uid} "
                "connections open; close some"
            )
        return None

    def _drop(self, fd: int) -> None:
        conn = self.connections.pop(fd, None)
        if conn is not None:
            self.limits.disconnected(conn.peer.uid)
            if not conn.parked:
                self.selector.unregister(conn.sock)
            conn.sock.close()
            os.close(conn.pidfd)

    def _expire_connections(self) -> None:
        now = time.monotonic()
        for fd in [fd for fd, conn in self.connections.items() if conn.deadline <= now]:
            self._drop(fd)

    def _readable(self, fd: int) -> None:
        conn = self.connections[fd]
        self.last_activity = time.monotonic()
        conn.deadline = self.last_activity + self.config.connection_deadline
        if not self.limits.may_send(conn.peer.uid):
            with contextlib.suppress(OSError):
                fdpass.close_all(fdpass.receive(conn.sock, max_fds=0).fds)
            limit = self.config.rate_per_uid
            error = RateLimited(f"uid {conn.peer.uid} sends more than {limit:g} messages a second")
            self._reply(conn, Reply(encode_error(error)))
            self._drop(fd)
            return
        try:
            data = fdpass.receive_request(conn.sock)
        except BrokerError as error:
            self._reply(conn, Reply(encode_error(error)))
            return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)
            return
        result = self._handle(conn, data)
        if result is not None:
            self._reply(conn, result)

    def _reply(self, conn: Connection, reply: Reply) -> None:
        """Send, then close the broker's copies; a lease whose fds never arrived ends."""
        try:
            fdpass.send(conn.sock, reply.data, reply.fds)
        except OSError:
            self._drop(conn.sock.fileno())
            lease = self.leases.by_id.get(reply.lease_id or "")
            if lease is not None:
                self._end_lease(lease, "released", "the reply could not be delivered")
        finally:
            fdpass.close_all(list(reply.fds))

    def _handle(self, conn: Connection, data: bytes) -> Reply | None:
        """The reply, or None while a decision waits for polkit (see _decided)."""
        try:
            message = decode_message(data)
        except BrokerError as error:
            log.debug("refused uid=%d pid=%d: %s", conn.peer.uid, conn.peer.pid, error)
            return Reply(encode_error(error))
        return self._guarded(conn, message, lambda: self._dispatch(conn, message))

    def _guarded(
        self, conn: Connection, message: Message, step: Callable[[], Reply | None]
    ) -> Reply | None:
        """Run one step of handling message; any failure becomes the reply (and is audited)."""
        try:
            return step()
        except BrokerError as error:
            if isinstance(message, Request):
                self._audit_refusal(conn, message, error)
            else:
                log.info("refused %s from uid %d: %s", message.op, conn.peer.uid, error)
            return Reply(encode_error(error))
        except Exception as exc:
            log.exception("internal error")
            return Reply(encode_error(BrokerError(f"internal error: {exc}")))

    def _dispatch(self, conn: Connection, message: Message) -> Reply | None:
        if isinstance(message, Request):
            return self._request(conn, message)
        if isinstance(message, StatusQuery):
            return Reply(encode_reply("status", self.status()))
        if isinstance(message, Ping):
            return Reply(encode_reply("ping", {"broker": VERSION, "pid": os.getpid()}))
        if isinstance(message, Release):
            return self._release(conn, message)
        if isinstance(message, Revoke):
            return self._revoke(conn, message)
        if isinstance(message, Detach):
            return self._detach(conn, message)
        raise AssertionError(f"unhandled message {message!r}")

    def _admit(
        self,
        conn: Connection,
        message: Message,
        grant: Grant,
        details: dict[str, str],
        then: Callable[[], Reply],
        cleanup: Callable[[], None] = lambda: None,
    ) -> Reply | None:
        """Go on with then() now, or once polkit agrees when the policy delegates to it.

        polkit is a D-Bus round trip that may take seconds, so it runs in a worker thread
        while the loop serves everyone else; the connection reads nothing meanwhile.
        """
        if grant.polkit_action is None:
            return then()
        try:
            self._may_park(conn)
            subject = polkit.subject_of(conn.peer.pid, conn.peer.uid, conn.pidfd)
        except BaseException:
            cleanup()
            raise
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="polkit")
        future = self.executor.submit(
            polkit.check, subject, grant.polkit_action, details,
            timeout=self.config.polkit_timeout,
        )  # fmt: skip
        self.selector.unregister(conn.sock)
        conn.parked = True
        self.pending.append(Pending(conn, message, future, then, cleanup))
        future.add_done_callback(lambda _: os.eventfd_write(self.wakeup, 1))
        return None

    def _may_park(self, conn: Connection) -> None:
        """Bound the checks waiting for polkit, per uid and overall, so one uid cannot make
        everyone else's checks wait out their deadlines."""
        mine = sum(1 for p in self.pending if p.conn.peer.uid == conn.peer.uid)
        if mine >= self.config.max_polkit_checks_per_uid:
            raise RateLimited(f"uid {conn.peer.uid} already has {mine} polkit checks waiting")
        if len(self.pending) >= self.config.max_polkit_checks:
            raise RateLimited(f"{len(self.pending)} polkit checks are waiting; retry later")

    def _decided(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wakeup)
        for pending in [p for p in self.pending if p.future.done()]:
            self.pending.remove(pending)
            conn = pending.conn
            if self.connections.get(conn.sock.fileno()) is not conn:
                pending.cleanup()  # the client went away meanwhile
                continue
            conn.parked = False
            self.selector.register(conn.sock, selectors.EVENT_READ, "conn")
            error = pending.future.exception()
            if error is not None:
                pending.cleanup()
                result = self._guarded(conn, pending.message, lambda e=error: _raise(e))
            else:
                result = self._guarded(conn, pending.message, pending.then)
            if result is not None:
                self._reply(conn, result)

    def _authorize(self, conn: Connection, decide: Callable[[Policy], Grant]) -> Grant:
        if not self.policy.files:
            raise Denied(
                f"there is no policy file at {self.policy.path}, so nothing is allowed; "
                "install one (see examples/policy.toml) and reload (SIGHUP)"
            )
        return decide(self.policy)

    def _consumer(self, conn: Connection, request: Request) -> Consumer:
        if request.consumer_pid is None or request.consumer_pid == conn.peer.pid:
            return Consumer(conn.peer.pid, conn.peer.uid, os.dup(conn.pidfd))
        try:
            pidfd = os.pidfd_open(request.consumer_pid)
        except OSError:
            raise ConsumerGone(f"consumer pid {request.consumer_pid} does not exist") from None
        try:
            uid = procinfo.read_status(request.consumer_pid, pidfd).uid
        except BaseException:
            os.close(pidfd)
            raise
        return Consumer(request.consumer_pid, uid, pidfd)

    def _grant_for(self, conn: Connection, request: Request, consumer: Consumer) -> Grant:
        return self._authorize(
            conn,
            lambda policy: policy.authorize(
                conn.peer,
                request,
                queues_held_by_uid=self.leases.queues_held_by(conn.peer.uid),
                consumer_uid=consumer.uid,
            ),
        )

    def _request(self, conn: Connection, request: Request) -> Reply | None:
        """Policy first (who may have what), then polkit where delegated, then the kernel."""
        consumer = self._consumer(conn, request)
        try:
            grant = self._grant_for(conn, request, consumer)
        except BaseException:
            os.close(consumer.pidfd)
            raise
        details = polkit.request_details(request, consumer.pid, consumer.uid)
        return self._admit(
            conn, request, grant, details,
            lambda: self._hand_out(conn, request, consumer),
            lambda: os.close(consumer.pidfd),
        )  # fmt: skip

    def _hand_out(self, conn: Connection, request: Request, consumer: Consumer) -> Reply:
        """Busy queues, memory budget, attachment, sockets, lease: every refusal comes before
        any socket, and all of them before anything is attached.

        The policy is asked again here: after a polkit check, the quota and the policy
        (reloaded meanwhile, perhaps) must still allow the request.
        """
        queue_ids = range(request.start_queue, request.start_queue + request.queues)
        try:
            grant = self._grant_for(conn, request, consumer)
            busy = self.leases.holders(netdev.ifindex_of(request.ifname), list(queue_ids))
            if busy:
                raise QueueBusy(
                    "; ".join(_held_by(lease, request.ifname, queue_ids) for lease in busy)
                )
            memlock.ensure(
                consumer.pid,
                memlock.needed_bytes(request.queues, request.umem_bytes),
                self.leases.held_bytes(consumer.uid),
                may_raise=grant.raise_memlock,
                pidfd=consumer.pidfd,
            )
            start_time = procinfo.start_time(consumer.pid, consumer.pidfd)
            single = grant.modes[0] if len(grant.modes) == 1 else "auto"
            wish = request.mode if request.mode != "auto" else single
            attachment = self.loader.ensure(request.ifname, wish, queue_ids)
            fds = xsk.create_sockets(attachment, list(queue_ids))
        except BaseException:
            os.close(consumer.pidfd)
            raise
        try:
            info = self._record(conn, request, grant, consumer, attachment, start_time)
        except BaseException:
            xsk.release_slots(attachment, list(queue_ids))
            fdpass.close_all(fds)
            os.close(consumer.pidfd)
            raise
        payload = {"lease": info.to_wire(), "netdev_template": netdev_template(info)}
        return Reply(encode_reply("request", payload), fds, info.lease_id)

    def _record(
        self,
        conn: Connection,
        request: Request,
        grant: Grant,
        consumer: Consumer,
        attachment: Attachment,
        start_time: int,
    ) -> LeaseInfo:
        """The lease in the table, the journal and the fd store; the pidfd now belongs to it."""
        info = LeaseInfo(
            lease_id=new_lease_id(),
            ifname=attachment.ifname,
            ifindex=attachment.ifindex,
            queue_ids=[*range(request.start_queue, request.start_queue + request.queues)],
            mode=attachment.mode,
            uid=conn.peer.uid,
            pid=conn.peer.pid,
            consumer_pid=consumer.pid,
            tag=request.tag,
            umem_bytes=request.umem_bytes,
            created=time.time(),
            extra={"consumer_uid": consumer.uid, "rule": grant.rule},
        )
        self.leases.add(Lease(info, consumer.pidfd, start_time))
        self.selector.register(consumer.pidfd, selectors.EVENT_READ, "pidfd")
        self.notifier.store_fds(FDSTORE_PREFIX + info.lease_id, [consumer.pidfd])
        self._audit("granted", info, f"{info.mode} mode, rule {grant.rule}")
        self._changed()
        return info

    def _lease(self, lease_id: str) -> Lease:
        lease = self.leases.by_id.get(lease_id)
        if lease is None:
            raise NoSuchLease(f"no live lease has id {lease_id!r}")
        return lease

    def _release(self, conn: Connection, message: Release) -> Reply:
        lease = self._lease(message.lease_id)
        if conn.peer.uid != lease.info.uid:
            raise Denied(
                f"lease {message.lease_id} belongs to uid {lease.info.uid}; "
                "an admin may revoke it instead"
            )
        self._end_lease(lease, "released", f"released by uid {conn.peer.uid}")
        return Reply(encode_reply("release", {"lease_id": message.lease_id}))

    def _revoke(self, conn: Connection, message: Revoke) -> Reply | None:
        """Admin: empty a lease's slots now, so its queues' traffic returns to the stack."""
        lease = self._lease(message.lease_id)
        ifname = lease.info.ifname
        grant = self._authorize(
            conn, lambda policy: policy.authorize_admin(conn.peer, "revoke", ifname=ifname)
        )
        details = {"op": "revoke", "lease_id": message.lease_id, "interface": ifname}
        return self._admit(conn, message, grant, details, lambda: self._do_revoke(conn, message))

    def _do_revoke(self, conn: Connection, message: Revoke) -> Reply:
        lease = self._lease(message.lease_id)
        self._end_lease(lease, "revoked", f"revoked by uid {conn.peer.uid}")
        payload = {"lease_id": message.lease_id, "queue_ids": lease.info.queue_ids}
        return Reply(encode_reply("revoke", payload))

    def _detach(self, conn: Connection, message: Detach) -> Reply | None:
        """Admin: take the program off an interface; live leases block it unless forced."""
        grant = self._authorize(
            conn,
            lambda policy: policy.authorize_admin(conn.peer, "detach", ifname=message.ifname),
        )
        details = {"op": "detach", "interface": message.ifname, "force": str(message.force)}
        return self._admit(conn, message, grant, details, lambda: self._do_detach(conn, message))

    def _do_detach(self, conn: Connection, message: Detach) -> Reply:
        ifindex = netdev.ifindex_of(message.ifname)
        live = [lease for lease in self.leases.by_id.values() if lease.info.ifindex == ifindex]
        if live and not message.force:
            raise LeasesLive(
                f"{message.ifname} has {len(live)} live lease(s) ("
                + ", ".join(f"{x.info.lease_id} for pid {x.info.consumer_pid}" for x in live)
                + "); stop their consumers or pass --force"
            )
        for lease in live:
            self._end_lease(lease, "revoked", f"{message.ifname} detached by uid {conn.peer.uid}")
        attached = ifindex in self.loader.attachments or self.loader.adopt_one(ifindex)
        self.loader.detach(ifindex)
        log_event(
            log,
            f"detached {message.ifname}",
            event="detached",
            interface=message.ifname,
            uid=conn.peer.uid,
            pid=conn.peer.pid,
        )
        self._changed()
        return Reply(encode_reply("detach", {"ifname": message.ifname, "was_attached": attached}))

    def _end_lease(self, lease: Lease, event: str, reason: str) -> None:
        """Forget the lease and empty its slots: sockets its consumer (or a child) may still
        hold no longer receive, so nobody keeps queues the quota no longer counts."""
        self._release_slots(lease.info)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(lease.pidfd)
        self.leases.end(lease.info.lease_id)
        self.notifier.remove_fds(FDSTORE_PREFIX + lease.info.lease_id)
        self._audit(event, lease.info, reason)
        self._changed()

    def _links_changed(self) -> None:
        """An interface went away: its link is already detached by the kernel; end its
        leases and remove its pins, so that a new interface starts clean."""
        assert self.linkwatch is not None
        for event in self.linkwatch.drain():
            if event.kind != "removed":
                continue
            for lease in list(self.leases.by_id.values()):
                if lease.info.ifindex == event.ifindex:
                    self._end_lease(lease, "expired", f"interface {event.ifname} was removed")
            if event.ifindex in self.loader.attachments:
                log_event(
                    log,
                    f"{event.ifname} removed: attachment and pins dropped",
                    event="detached",
                    interface=event.ifname,
                )
            self.loader.forget(event.ifindex)
            self._changed()

    def _release_slots(self, info: LeaseInfo) -> None:
        attachment = self.loader.attachments.get(info.ifindex)
        if attachment is not None:
            xsk.release_slots(attachment, info.queue_ids)

    def _consumer_exited(self, pidfd: int) -> None:
        for lease in self.leases.by_pidfd(pidfd):
            self._end_lease(lease, "expired", f"consumer pid {lease.info.consumer_pid} exited")

    def _audit(self, event: str, info: LeaseInfo, reason: str) -> None:
        """One structured line per decision (journal fields; key=value on stderr)."""
        log_event(
            log,
            f"{event} lease {info.lease_id}: {info.ifname} queues {info.queue_ids} "
            f"for pid {info.consumer_pid} ({reason})",
            event=event,
            lease=info.lease_id,
            interface=info.ifname,
            queues=info.queue_ids,
            uid=info.uid,
            pid=info.pid,
            consumer_pid=info.consumer_pid,
            tag=info.tag or "",
            reason=reason,
        )

    def _audit_refusal(self, conn: Connection, request: Request, error: BrokerError) -> None:
        queues = list(range(request.start_queue, request.start_queue + request.queues))
        log_event(
            log,
            f"denied {request.ifname} queues {queues} to uid {conn.peer.uid}: {error}",
            event="denied",
            interface=request.ifname,
            queues=queues,
            uid=conn.peer.uid,
            pid=conn.peer.pid,
            consumer_pid=request.consumer_pid or conn.peer.pid,
            tag=request.tag or "",
            code=error.code,
            reason=error.message,
        )

    def _changed(self) -> None:
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """The one line `systemctl status` shows."""
        attachments = ", ".join(f"{a.ifname}/{a.mode}" for a in self.loader.attachments.values())
        return f"{len(self.leases.by_id)} lease(s); attached: {attachments or 'none'}"

    def status(self) -> dict:
        """Attachments and leases; at most max_status_leases leases, so the reply always
        fits one datagram (lease_count says how many there are)."""
        shown = list(self.leases.by_id.values())[: self.config.max_status_leases]
        return {
            "broker": {"version": VERSION, "pid": os.getpid(), "policy": str(self.policy.path)},
            "attachments": [a.describe() for a in self.loader.attachments.values()],
            "leases": [lease.info.to_wire() for lease in shown],
            "lease_count": len(self.leases.by_id),
        }


def _raise(error: BaseException) -> Reply:
    raise error


def _held_by(lease: Lease, ifname: str, asked: range) -> str:
    """'queue 2 of eth0 is leased to pid 4242 (uid 1000, tag vm7, lease ...)'."""
    info = lease.info
    taken = [q for q in info.queue_ids if q in asked]
    which = f"queue {taken[0]}" if len(taken) == 1 else f"queues {taken}"
    verb = "is" if len(taken) == 1 else "are"
    tag = f", tag {info.tag}" if info.tag else ""
    return (
        f"{which} of {ifname} {verb} leased to pid {info.consumer_pid} "
        f"(uid {info.extra.get('consumer_uid', info.uid)}{tag}, lease {info.lease_id})"
    )
