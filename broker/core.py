"""The broker's use cases, with no sockets and no selector.

request, release, revoke, detach, status and ping take a Caller (who is asking, as the kernel
said) and a typed message, and return a typed reply (Done) or NeedsPolkit, which the server
resolves off its loop and hands back through resume(). consumer_exited, link_removed and
reload_policy are the events the server observes for it. The clock and the lease ids are
injected, so tests drive this in-process and deterministically; the kernel adapters
(loader, xsk, netdev, memlock, procinfo) are the real ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from broker import bpf, fdpass, memlock, netdev, procinfo, xsk
from broker.audit import log_event, queue_span
from broker.errors import (
    AttachFailed,
    BadRequest,
    BrokerError,
    ConsumerGone,
    Denied,
    InterfaceTaken,
    LeasesLive,
    NoSuchLease,
    QueueBusy,
    XdpConflict,
)
from broker.leases import LeaseTable, LiveLease
from broker.loader import Attachment, Loader
from broker.policy import Caller, Grant, Policy, PolicyError
from broker.protocol import (
    BrokerInfo,
    Detach,
    Detached,
    Granted,
    LeaseInfo,
    Message,
    Ping,
    Pong,
    Release,
    Released,
    Reply,
    Request,
    Revoke,
    Revoked,
    Status,
    StatusQuery,
)
from broker.version import broker_version

log = logging.getLogger("xsk-broker")
# Lease pidfds parked in systemd's fd store survive a restart of the service.
FDSTORE_PREFIX = "lease-"


class PidfdWatch(Protocol):
    """Whoever tells the core that a consumer exited (the server's selector)."""

    def watch(self, pidfd: int) -> None: ...

    def unwatch(self, pidfd: int) -> None: ...


@dataclass(frozen=True)
class MapPaths:
    """Where a map lease's consumer finds the map: dp_path always, map_pin when pinned."""

    dp_path: str
    map_pin: str


class MapHandouts(Protocol):
    """What a map lease gets besides the lease (maplease.MapLeases): made before the lease is
    recorded, removed when it ends. open() takes over the lease's map fd (closed by close(),
    or by open() itself if it fails); map_fd() lends it; prune() removes at start what an
    earlier broker left of leases not in live."""

    def open(self, lease_id: str, consumer_uid: int, map_fd: int) -> MapPaths: ...

    def close(self, lease_id: str) -> None: ...

    def map_fd(self, lease_id: str) -> int | None: ...

    def prune(self, live: set[str]) -> None: ...


# The operation a front end names when it refuses before a message was read.
NO_OP = "none"


class Observer(Protocol):
    """Who counts the answers (metrics.py): result is the reply, or the refusal; the core
    reports every message it decides, a front end what it refuses itself (as NO_OP)."""

    def decided(self, op: str, result: Reply | BrokerError) -> None: ...


class Unobserved:
    """The observer when nobody counts."""

    def decided(self, op: str, result: Reply | BrokerError) -> None:
        pass


class FdStore(Protocol):
    """Where lease pidfds outlive a restart (systemd's fd store, or nowhere)."""

    def store_fds(self, name: str, fds: Sequence[int]) -> None: ...

    def remove_fds(self, name: str) -> None: ...


@dataclass(frozen=True)
class Done:
    """A reply; fds go with it (the sender closes them), lease_id names the lease they are
    for, which ends if they cannot be delivered."""

    reply: Reply
    fds: Sequence[int] = ()
    lease_id: str | None = None


@dataclass
class NeedsPolkit:
    """The policy delegates to polkit: ask it for action with details, then resume()."""

    action: str
    details: dict[str, str]
    resume: Callable[[BaseException | None], Done]
    abandon: Callable[[], None]  # the caller went away or the broker stops: nothing is asked


Outcome = Done | NeedsPolkit


def load_policy(path: Path) -> Policy:
    """The policy at path; a missing file is a policy with no rules (deny by default), and a
    broken one raises PolicyError."""
    if not path.exists():
        log.warning("no policy file at %s: every request will be denied", path)
        return Policy(path, (), (), ())
    return Policy.load(path)


@dataclass
class Consumer:
    """The process the sockets are for, with the one pidfd that is closed in one place:
    here, unless a lease took it."""

    pid: int
    uid: int
    pidfd: int

    def take(self) -> int:
        fd, self.pidfd = self.pidfd, -1
        return fd

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pidfd >= 0:
            os.close(self.take())


@dataclass
class Service:
    """The broker's state and what may be done to it."""

    policy_path: Path
    loader: Loader
    leases: LeaseTable
    watch: PidfdWatch
    fdstore: FdStore
    clock: Callable[[], float] = time.time
    # 48 random bits; not secrets.token_hex, whose import (hmac, OpenSSL) costs ~6 ms at start
    new_lease_id: Callable[[], str] = field(default=lambda: os.urandom(6).hex())
    max_status_leases: int = 200
    on_change: Callable[[str], None] = field(default=lambda _line: None)
    maps: MapHandouts | None = None  # None: map leases are refused
    observer: Observer = field(default_factory=Unobserved)

    def __post_init__(self) -> None:
        self.policy = load_policy(self.policy_path)

    def start(self, stored_pidfds: dict[str, int]) -> None:
        """Adopt pinned attachments and the previous broker's leases (stored_pidfds: the
        fd store's entries, by name)."""
        for attachment in self.loader.adopt_all():
            log.info("adopted %s", attachment.describe())
        by_lease = {name.removeprefix(FDSTORE_PREFIX): fd for name, fd in stored_pidfds.items()}
        for info in self.leases.restore(by_lease):
            if info.handout != "map":  # a map lease's slots: _reconcile(), in one batch
                self._release_slots(info)
            self._audit("expired", info, "consumer exited while the broker was down")
        live = {FDSTORE_PREFIX + lease_id for lease_id in self.leases.by_id}
        for name in set(stored_pidfds) - live:
            self.fdstore.remove_fds(name)
        for lease in list(self.leases.by_id.values()):
            self.watch.watch(lease.pidfd)
            name = FDSTORE_PREFIX + lease.info.lease_id
            if name not in stored_pidfds:  # found again by pid: park the new pidfd too
                self.fdstore.store_fds(name, [lease.pidfd])
            if lease.info.ifindex not in self.loader.attachments:
                self._end(lease, "expired", "its interface vanished while the broker was down")
        self._reconcile()
        self._report_status()

    def _reconcile(self) -> None:
        """After adoption and replay, leave nothing of a map lease that is not live: an
        earlier broker leaves its steered slots, socket and pin behind when it ended while no
        broker ran, or when the broker died between steering its queues and journaling it.
        Each interface's such queues go back to the shared XSKMAP in one batch, audited."""
        live = [
            info for lease in self.leases.by_id.values() if (info := lease.info).handout == "map"
        ]
        if self.maps is not None:
            self.maps.prune({info.lease_id for info in live})
        for attachment in self.loader.attachments.values():
            queues = attachment.reconcile(
                {q for info in live if info.ifindex == attachment.ifindex for q in info.queue_ids}
            )
            if queues:
                log_event(
                    log,
                    f"reconciled {attachment.ifname}: queues {queue_span(queues)} redirect "
                    "through the shared XSKMAP again (no live lease owned their map)",
                    event="reconciled",
                    interface=attachment.ifname,
                    queues=queues,
                    reason="steered to a map no live lease owns",
                )

    def close(self) -> None:
        """Close fds; leases and attachments stay (journal and pins) for the next broker."""
        self.leases.close()
        self.loader.close()

    def handle(self, caller: Caller, message: Message) -> Outcome:
        """The outcome of message from caller; a refusal is raised as its BrokerError (and
        a refused request audited)."""
        return self._audited(caller, message, lambda: self._dispatch(caller, message))

    def _dispatch(self, caller: Caller, message: Message) -> Outcome:
        if isinstance(message, Request):
            return self._request(caller, message)
        if isinstance(message, StatusQuery):
            return Done(self.status(caller, message))
        if isinstance(message, Ping):
            return Done(Pong(broker_version(), os.getpid()))
        if isinstance(message, Release):
            return Done(self._release(caller, message))
        if isinstance(message, Revoke):
            return self._revoke(caller, message)
        return self._detach(caller, message)

    def _audited(self, caller: Caller, message: Message, step: Callable[[], Outcome]) -> Outcome:
        try:
            outcome = step()
        except BrokerError as error:
            if isinstance(message, Request):
                self._audit_refusal(caller, message, error)
            else:
                log.info("refused %s from uid %d: %s", message.op, caller.uid, error)
            self.observer.decided(message.op, error)
            raise
        if isinstance(outcome, Done):
            self.observer.decided(message.op, outcome.reply)
        return outcome

    def _after_polkit(
        self,
        caller: Caller,
        message: Message,
        grant: Grant,
        details: dict[str, str],
        then: Callable[[], Done],
        abandon: Callable[[], None] = lambda: None,
    ) -> NeedsPolkit:
        """Go on with then() once polkit said yes; abandon() if it did not."""
        assert grant.polkit_action is not None

        def resume(verdict: BaseException | None) -> Done:
            def step() -> Done:
                if verdict is not None:
                    abandon()
                    raise verdict
                return then()

            done = self._audited(caller, message, step)
            assert isinstance(done, Done)
            return done

        return NeedsPolkit(grant.polkit_action, details, resume, abandon)

    def _authorize(self, decide: Callable[[Policy], Grant]) -> Grant:
        if not self.policy.files:
            raise Denied(
                f"there is no policy file at {self.policy.path}, so nothing is allowed; "
                "install one (see examples/policy.toml) and reload (SIGHUP)"
            )
        return decide(self.policy)

    def _grant(self, caller: Caller, request: Request, consumer: Consumer) -> Grant:
        return self._authorize(
            lambda policy: policy.authorize(
                caller,
                request,
                queues_held_by_uid=self.leases.queues_held_by(caller.uid),
                consumer_uid=consumer.uid,
            )
        )

    def _consumer(self, caller: Caller, request: Request) -> Consumer:
        if request.consumer_pid is not None:
            _same_pid_namespace(caller, request.consumer_pid)
        if request.consumer_pid is None or request.consumer_pid == caller.pid:
            return Consumer(caller.pid, caller.uid, os.dup(caller.pidfd))
        try:
            pidfd = os.pidfd_open(request.consumer_pid)
        except OSError:
            raise ConsumerGone(f"consumer pid {request.consumer_pid} does not exist") from None
        with Consumer(request.consumer_pid, -1, pidfd) as consumer:
            consumer.uid = procinfo.read_status(request.consumer_pid, pidfd).uid
            return Consumer(consumer.pid, consumer.uid, consumer.take())

    def _request(self, caller: Caller, request: Request) -> Outcome:
        """Policy first (who may have what), then polkit where delegated, then the kernel."""
        consumer = self._consumer(caller, request)
        with consumer:
            grant = self._grant(caller, request, consumer)
            if grant.polkit_action is None:
                return self._hand_out(caller, request, grant, consumer)
            from broker import polkit

            details = polkit.request_details(request, consumer.pid, consumer.uid)
            waiting = Consumer(consumer.pid, consumer.uid, consumer.take())

        def then() -> Done:
            # After a polkit check the quota and the policy (reloaded meanwhile, perhaps)
            # must still allow the request.
            with waiting:
                return self._hand_out(
                    caller, request, self._grant(caller, request, waiting), waiting
                )

        return self._after_polkit(caller, request, grant, details, then, waiting.__exit__)

    def _hand_out(self, caller: Caller, request: Request, grant: Grant, consumer: Consumer) -> Done:
        """Busy queues, memory budget, attachment, sockets, lease: every refusal comes before
        any socket, and all of them before anything is attached."""
        queue_ids = list(request.queue_ids)
        ifindex = netdev.ifindex_of(request.ifname)
        busy = self.leases.holders(ifindex, queue_ids)
        if busy:
            raise QueueBusy(_some([_held_by(lease, request) for lease in busy], "; "))
        self._check_tenancy(request, ifindex, consumer)
        # The interface's refusals before the memlock limit is raised: refusals change nothing.
        self.loader.check(request.ifname, grant.mode, request.queue_ids, ifindex)
        memlock.ensure(
            consumer.pid,
            memlock.needed_bytes(request.queues, request.umem_bytes),
            self.leases.held_bytes(consumer.uid),
            may_raise_to=self._may_raise_to(grant, request, consumer),
            pidfd=consumer.pidfd,
        )
        start_time = procinfo.start_time(consumer.pid, consumer.pidfd)
        if request.wants_map:
            return self._hand_out_map(caller, request, grant, consumer, ifindex, start_time)
        attachment = self.loader.ensure(request.ifname, grant.mode, request.queue_ids, ifindex)
        fds = xsk.create_sockets(attachment, queue_ids)
        try:
            info = self._record(caller, request, grant, consumer, attachment, start_time)
        except BaseException:
            xsk.release_slots(attachment, queue_ids)
            fdpass.close_all(fds)
            raise
        return Done(Granted(info), fds, info.lease_id)

    def _hand_out_map(
        self,
        caller: Caller,
        request: Request,
        grant: Grant,
        consumer: Consumer,
        ifindex: int,
        start_time: int,
    ) -> Done:
        """A map lease: its queues redirect through an XSKMAP of its own, which its consumer
        fills itself (whoever holds an XSKMAP fd can fill any slot), so no other queue is
        reachable through it; when the lease ends they go back to the shared map and the
        lease's map steers nothing, whoever still holds it. Its fds go out through maps."""
        if self.maps is None:
            raise Denied("this broker hands out no maps (it has no device-plugin front end)")
        attachment = self.loader.ensure(request.ifname, grant.mode, request.queue_ids, ifindex)
        if attachment.queues_fd < 0:
            raise XdpConflict(
                f"{request.ifname} carries the program of an older broker, which has no "
                f"per-queue maps; once its leases end, detach it (xsk-broker detach --ifname "
                f"{request.ifname}) and ask again"
            )
        try:
            lease_map = bpf.create_xskmap("xsks_lease", attachment.queue_count)
        except bpf.BpfError as exc:
            raise AttachFailed(
                f"creating the lease's XSKMAP: {exc.strerror}", errno=exc.errno
            ) from None
        lease_id = self.new_lease_id()
        paths = self.maps.open(lease_id, consumer.uid, lease_map)
        queue_ids = list(request.queue_ids)
        try:
            attachment.steer(queue_ids, lease_map)
            info = self._record(
                caller, request, grant, consumer, attachment, start_time, lease_id, paths
            )
        except BaseException:
            attachment.unsteer(queue_ids)
            self.maps.close(lease_id)
            raise
        return Done(Granted(info), (), info.lease_id)

    def _may_raise_to(self, grant: Grant, request: Request, consumer: Consumer) -> int | None:
        """The most the broker may raise the consumer's limit to (None: the rule has no
        raise_memlock): the rule's UMEM maximum for every queue the consumer's uid would
        hold, this lease's and its live leases'."""
        if not grant.raise_memlock:
            return None
        held = sum(
            len(lease.info.queue_ids)
            for lease in self.leases.by_id.values()
            if lease.info.consumer_uid == consumer.uid
        )
        return memlock.needed_bytes(request.queues + held, grant.max_umem_bytes_per_queue)

    def _check_tenancy(self, request: Request, ifindex: int, consumer: Consumer) -> None:
        """Under exclusive tenancy, an interface with live leases is refused to consumers
        of any other uid: a consumer can bind its socket to any queue of its interface."""
        if not self.policy.exclusive_tenancy:
            return
        other = next(
            (
                lease
                for lease in self.leases.by_id.values()
                if lease.info.ifindex == ifindex and lease.info.consumer_uid != consumer.uid
            ),
            None,
        )
        if other is not None:
            info = other.info
            tag = f", tag {info.tag!r}" if info.tag else ""
            raise InterfaceTaken(
                f"{request.ifname} is leased to consumer uid {info.consumer_uid} (lease "
                f"{info.lease_id}{tag}, pid {info.consumer_pid}), and the policy's "
                "exclusive_tenancy keeps other uids off an interface while any lease on it "
                "is live: use another interface, or ask again once that lease has ended",
                details={"holder_uid": info.consumer_uid, "lease_id": info.lease_id},
            )

    def _record(
        self,
        caller: Caller,
        request: Request,
        grant: Grant,
        consumer: Consumer,
        attachment: Attachment,
        start_time: int,
        lease_id: str | None = None,
        paths: MapPaths | None = None,
    ) -> LeaseInfo:
        """The lease in the table, the journal and the fd store; the pidfd now belongs to it."""
        info = LeaseInfo(
            lease_id=lease_id or self.new_lease_id(),
            ifname=attachment.ifname,
            ifindex=attachment.ifindex,
            queue_ids=list(request.queue_ids),
            mode=attachment.mode,
            uid=caller.uid,
            pid=caller.pid,
            consumer_pid=consumer.pid,
            tag=request.tag,
            umem_bytes=request.umem_bytes,
            created=self.clock(),
            consumer_uid=consumer.uid,
            rule=grant.rule,
            handout="map" if paths else "sockets",
            dp_path=paths.dp_path if paths else "",
            map_pin=paths.map_pin if paths else "",
        )
        self.leases.add(LiveLease(info, consumer.pidfd, start_time))
        pidfd = consumer.take()
        self.watch.watch(pidfd)
        self.fdstore.store_fds(FDSTORE_PREFIX + info.lease_id, [pidfd])
        self._audit("granted", info, f"{info.mode} mode, rule {grant.rule}")
        self._report_status()
        return info

    def _lease(self, lease_id: str) -> LiveLease:
        lease = self.leases.by_id.get(lease_id)
        if lease is None:
            raise NoSuchLease(f"no live lease has id {lease_id!r}")
        return lease

    def _release(self, caller: Caller, message: Release) -> Released:
        lease = self._lease(message.lease_id)
        if caller.uid != lease.info.uid:
            raise Denied(
                f"lease {message.lease_id} belongs to uid {lease.info.uid}; "
                "an admin may revoke it instead"
            )
        self._end(lease, "released", f"released by uid {caller.uid}")
        return Released(message.lease_id)

    def _admin(
        self, caller: Caller, message: Revoke | Detach, ifname: str, act: Callable[[], Done]
    ) -> Outcome:
        def authorize() -> Grant:
            return self._authorize(
                lambda policy: policy.authorize_admin(caller, message.op, ifname=ifname)
            )

        grant = authorize()
        if grant.polkit_action is None:
            return act()

        def then() -> Done:  # the policy, reloaded meanwhile perhaps, must still allow it
            authorize()
            return act()

        details = {"op": message.op, "interface": ifname} | {
            k: str(v) for k, v in vars(message).items() if k != "ifname"
        }
        return self._after_polkit(caller, message, grant, details, then)

    def _revoke(self, caller: Caller, message: Revoke) -> Outcome:
        """Admin: empty a lease's slots now, so its queues' traffic returns to the stack."""
        ifname = self._lease(message.lease_id).info.ifname

        def then() -> Done:
            lease = self._lease(message.lease_id)
            self._end(lease, "revoked", f"revoked by uid {caller.uid}")
            return Done(Revoked(message.lease_id, lease.info.queue_ids))

        return self._admin(caller, message, ifname, then)

    def _detach(self, caller: Caller, message: Detach) -> Outcome:
        """Admin: take the program off an interface; live leases block it unless forced."""
        return self._admin(
            caller, message, message.ifname, lambda: self._do_detach(caller, message)
        )

    def _do_detach(self, caller: Caller, message: Detach) -> Done:
        ifindex = netdev.ifindex_of(message.ifname)
        live = [lease for lease in self.leases.by_id.values() if lease.info.ifindex == ifindex]
        if live and not message.force:
            raise LeasesLive(
                f"{message.ifname} has {len(live)} live lease(s) ("
                + _some([f"{x.info.lease_id} for pid {x.info.consumer_pid}" for x in live], ", ")
                + "); stop their consumers or pass --force"
            )
        for lease in live:
            self._end(lease, "revoked", f"{message.ifname} detached by uid {caller.uid}")
        attached = ifindex in self.loader.attachments or self.loader.adopt_one(ifindex)
        self.loader.detach(ifindex)
        log_event(
            log,
            f"detached {message.ifname}",
            event="detached",
            interface=message.ifname,
            uid=caller.uid,
            pid=caller.pid,
        )
        self._report_status()
        return Done(Detached(message.ifname, attached))

    def status(self, caller: Caller, query: StatusQuery) -> Status:
        """Attachments, and at most max_status_leases of the leases caller may see that match
        query; the counts say how many were left out and why. A caller sees the leases it
        asked for or consumes, an admin (policy.administers) those of its interfaces, and
        root all (it can read the lease journal anyway). A front end may list fewer, to fit
        its wire, and adds those to leases_trimmed."""
        admin: dict[str, bool] = {}

        def visible(info: LeaseInfo) -> bool:
            if caller.uid in (0, info.uid, info.consumer_uid):
                return True
            if info.ifname not in admin:
                admin[info.ifname] = self.policy.administers(caller, info.ifname)
            return admin[info.ifname]

        every = [lease.info for lease in self.leases.by_id.values()]
        matching = [info for info in every if query.matches(info) and visible(info)]
        shown = matching[: self.max_status_leases]
        return Status(
            BrokerInfo(broker_version(), os.getpid(), str(self.policy.path)),
            [
                a.describe()
                for a in self.loader.attachments.values()
                if query.ifname in (None, a.ifname)
            ],
            shown,
            len(every),
            len(every) - len(matching),
            len(matching) - len(shown),
        )

    def undelivered(self, lease_id: str) -> None:
        """The reply carrying a lease's fds could not be sent: the lease ends."""
        lease = self.leases.by_id.get(lease_id)
        if lease is not None:
            self._end(lease, "released", "the reply could not be delivered")

    def consumer_exited(self, pidfd: int) -> None:
        for lease in self.leases.by_pidfd(pidfd):
            self._end(lease, "expired", f"consumer pid {lease.info.consumer_pid} exited")

    def link_removed(self, ifindex: int, ifname: str) -> None:
        """The kernel already detached the link: end the interface's leases and remove its
        pins, so that a new interface starts clean."""
        for lease in list(self.leases.by_id.values()):
            if lease.info.ifindex == ifindex:
                self._end(lease, "expired", f"interface {ifname} was removed")
        if ifindex in self.loader.attachments:
            log_event(
                log,
                f"{ifname} removed: attachment and pins dropped",
                event="detached",
                interface=ifname,
            )
        self.loader.forget(ifindex)
        self._report_status()

    def link_renamed(self, ifindex: int, ifname: str) -> None:
        """Leases and the attachment follow their interface's new name: revoke, status and
        their filters, the policy and the next request all go by the current name."""
        attachment = self.loader.attachments.get(ifindex)
        if attachment is not None:
            attachment.ifname = ifname
        for lease in self.leases.rename(ifindex, ifname):
            self._audit("renamed", lease.info, f"interface {ifindex} is now {ifname}")
        self._report_status()

    def reload_policy(self) -> None:
        """SIGHUP: use the new policy only if it loads whole; leases are never touched."""
        try:
            policy = load_policy(self.policy_path)
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

    def _end(self, lease: LiveLease, event: str, reason: str) -> None:
        """Forget the lease and empty its slots: sockets its consumer (or a child) may still
        hold no longer receive, so nobody keeps queues the quota no longer counts."""
        self._release_slots(lease.info)
        if lease.info.handout == "map" and self.maps is not None:
            self.maps.close(lease.info.lease_id)
        with contextlib.suppress(KeyError, ValueError):
            self.watch.unwatch(lease.pidfd)
        self.leases.end(lease.info.lease_id)
        self._audit(event, lease.info, reason)
        self.fdstore.remove_fds(FDSTORE_PREFIX + lease.info.lease_id)
        self._report_status()

    def _release_slots(self, info: LeaseInfo) -> None:
        attachment = self.loader.attachments.get(info.ifindex)
        if attachment is not None and info.handout == "map":
            attachment.unsteer(info.queue_ids)
        elif attachment is not None:
            xsk.release_slots(attachment, info.queue_ids)

    def _audit(self, event: str, info: LeaseInfo, reason: str) -> None:
        """One structured line per decision (journal fields; key=value on stderr)."""
        log_event(
            log,
            f"{event} lease {info.lease_id}: {info.ifname} queues {queue_span(info.queue_ids)} "
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

    def _audit_refusal(self, caller: Caller, request: Request, error: BrokerError) -> None:
        queues = list(request.queue_ids)
        log_event(
            log,
            f"denied {request.ifname} queues {queue_span(queues)} to uid {caller.uid}: {error}",
            event="denied",
            interface=request.ifname,
            queues=queues,
            uid=caller.uid,
            pid=caller.pid,
            consumer_pid=request.consumer_pid or caller.pid,
            tag=request.tag or "",
            code=error.code,
            reason=error.message,
        )

    def _report_status(self) -> None:
        self.on_change(self.status_line())

    def status_line(self) -> str:
        """The one line `systemctl status` shows."""
        attachments = ", ".join(f"{a.ifname}/{a.mode}" for a in self.loader.attachments.values())
        return f"{len(self.leases.by_id)} lease(s); attached: {attachments or 'none'}"


def _same_pid_namespace(caller: Caller, consumer_pid: int) -> None:
    """A consumer pid is read in the broker's pid namespace: from a caller in a namespace
    below it (a container's), the same number names another process (its pid 1 is the
    host's init), so such a caller may not name one."""
    depth = len(procinfo.read_status(caller.pid, caller.pidfd).nspids)
    if depth != len(procinfo.read_status(os.getpid()).nspids):
        raise BadRequest(
            f"consumer_pid {consumer_pid} would be read in the broker's pid namespace, but the "
            f"caller (pid {caller.pid}) runs in another pid namespace, where that number names "
            "another process: ask from the consumer itself (leave consumer_pid out), or from "
            "the broker's pid namespace"
        )


def _some(parts: Sequence[str], sep: str, most: int = 4) -> str:
    """At most `most` of parts, then how many more: an error naming other tenants' leases
    stays short whatever they hold (a tag alone can take 768 bytes of JSON)."""
    more = len(parts) - most
    return sep.join(parts[:most]) + (f"{sep}and {more} more" if more > 0 else "")


def _held_by(lease: LiveLease, request: Request) -> str:
    """'queue 2 of eth0 is leased to pid 4242 (uid 1000, tag vm7, lease ...)'."""
    info = lease.info
    taken = [q for q in info.queue_ids if q in request.queue_ids]
    which = f"queue {taken[0]}" if len(taken) == 1 else f"queues {taken}"
    verb = "is" if len(taken) == 1 else "are"
    tag = f", tag {info.tag}" if info.tag else ""
    return (
        f"{which} of {request.ifname} {verb} leased to pid {info.consumer_pid} "
        f"(uid {info.consumer_uid}{tag}, lease {info.lease_id})"
    )
