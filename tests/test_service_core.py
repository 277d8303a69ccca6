"""The use-case core in-process: no server, no sockets to the broker, a fixed clock and lease
ids, the real kernel underneath (a veth pair in its own namespace, a private bpffs).

Each call into the core runs inside the lab's network namespace, as the daemon runs inside
its own; the test process itself stays where it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from support import Spawn

from broker.core import Done, NeedsPolkit, Service
from broker.errors import ConsumerGone, Denied, LeasesLive, NoSuchLease, QueueBusy
from broker.frontend import Answer
from broker.jsonfront import JsonFrontEnd
from broker.leases import LeaseTable
from broker.loader import Loader
from broker.policy import Caller
from broker.protocol import (
    Detach,
    Detached,
    Granted,
    LeaseInfo,
    Message,
    Ping,
    Pong,
    Release,
    Request,
    Revoke,
    Revoked,
    Status,
    StatusQuery,
    decode_reply,
    encode_message,
    encode_reply,
)
from lab.brokerproc import LAB_POLICY
from lab.netlab import VethLab, in_netns

pytestmark = pytest.mark.kernel
T = TypeVar("T")
POLKIT_POLICY = """
[[allow]]
name = "ask-polkit"
users = ["*"]
polkit = true
admin = true
"""
NOW = 1_700_000_000.0


@dataclass
class Recorder:
    """The server's and systemd's side of the core's ports, as plain records."""

    watched: set[int] = field(default_factory=set)
    stored: dict[str, list[int]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def watch(self, pidfd: int) -> None:
        self.watched.add(pidfd)

    def unwatch(self, pidfd: int) -> None:
        self.watched.remove(pidfd)

    def store_fds(self, name: str, fds: Sequence[int]) -> None:
        self.stored[name] = list(fds)

    def remove_fds(self, name: str) -> None:
        self.stored.pop(name, None)


@dataclass
class Core:
    service: Service
    ports: Recorder
    lab: VethLab
    caller: Caller

    def call(self, action: Callable[[], T]) -> T:
        with in_netns(self.lab.ns_a):
            return action()

    def handle(self, message: Message, caller: Caller | None = None) -> Done | NeedsPolkit:
        return self.call(lambda: self.service.handle(caller or self.caller, message))

    def granted(self, request: Request) -> tuple[Done, LeaseInfo]:
        done = self.handle(request)
        assert isinstance(done, Done) and isinstance(done.reply, Granted)
        for fd in done.fds:  # the server would send them, then close its copies
            os.close(fd)
        return done, done.reply.lease


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def make_core(lab: VethLab, pin_root: Path, tmp_path: Path, policy: str) -> Core:
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy)
    ids = iter(f"{n:012x}" for n in range(1, 1000))
    ports = Recorder()
    with in_netns(lab.ns_a):
        pin_root.mkdir(mode=0o700, exist_ok=True)
        service = Service(
            policy_path,
            Loader(pin_root),
            LeaseTable(tmp_path),
            ports,
            ports,
            clock=lambda: NOW,
            new_lease_id=lambda: next(ids),
            on_change=ports.lines.append,
        )
    caller = Caller(0, 0, (), os.getpid(), os.pidfd_open(os.getpid()))
    return Core(service, ports, lab, caller)


@pytest.fixture
def core(lab4: VethLab, pin_root: Path, tmp_path: Path) -> Iterator[Core]:
    before = open_fds()
    made = make_core(lab4, pin_root, tmp_path, LAB_POLICY)
    yield made
    made.service.close()
    os.close(made.caller.pidfd)
    assert open_fds() <= before, "the core leaked fds"


def test_request_grants_a_lease_stamped_by_the_injected_clock(core: Core) -> None:
    done, lease = core.granted(Request(core.lab.ifname_a, 2, 1, umem_bytes=1 << 20, tag="vm1"))
    assert (lease.lease_id, lease.created, lease.queue_ids, lease.tag) == (
        "000000000001", NOW, [1, 2], "vm1"
    )  # fmt: skip
    assert (lease.consumer_pid, lease.consumer_uid) == (os.getpid(), 0)
    assert lease.rule.startswith("allow rule 'lab'")
    assert len(done.fds) == 2 and done.lease_id == lease.lease_id
    assert list(core.ports.stored) == ["lease-000000000001"]
    assert core.ports.lines[-1].startswith("1 lease(s); attached: " + core.lab.ifname_a)


def test_a_busy_queue_is_refused_and_changes_nothing(core: Core) -> None:
    core.granted(Request(core.lab.ifname_a, 2, umem_bytes=1 << 20))
    watched, stored = set(core.ports.watched), dict(core.ports.stored)
    with pytest.raises(QueueBusy, match=r"queue 1 of .* is leased to pid \d+ \(uid 0"):
        core.handle(Request(core.lab.ifname_a, 1, 1, umem_bytes=1 << 20))
    assert (core.ports.watched, core.ports.stored) == (watched, stored)
    assert len(core.service.leases.by_id) == 1


def test_release_is_the_owner_s_and_revoke_the_admin_s(core: Core) -> None:
    lease_id = core.granted(Request(core.lab.ifname_a, 1, umem_bytes=1 << 20))[1].lease_id
    stranger = Caller(4242, 4242, (), core.caller.pid, core.caller.pidfd)
    with pytest.raises(Denied, match="belongs to uid 0; an admin may revoke it"):
        core.handle(Release(lease_id), stranger)
    with pytest.raises(Denied, match="admin = true for revoke"):
        core.handle(Revoke(lease_id), stranger)
    assert core.handle(Revoke(lease_id)) == Done(Revoked(lease_id, [0]))
    with pytest.raises(NoSuchLease):
        core.handle(Release(lease_id))
    assert core.ports.watched == set() and core.ports.stored == {}


def test_consumer_exit_and_link_removal_end_leases(core: Core) -> None:
    child = os.fork()
    if child == 0:
        os.read(os.pipe()[0], 1)  # wait to be killed
    try:
        core.granted(Request(core.lab.ifname_a, 1, consumer_pid=child, umem_bytes=1 << 20))
        (pidfd,) = core.ports.watched
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    core.call(lambda: core.service.consumer_exited(pidfd))
    assert core.service.leases.by_id == {} and core.ports.watched == set()
    core.granted(Request(core.lab.ifname_a, 1, umem_bytes=1 << 20))
    ifindex = next(iter(core.service.loader.attachments))
    core.call(lambda: core.service.link_removed(ifindex, core.lab.ifname_a))
    assert core.service.leases.by_id == {} and core.service.loader.attachments == {}


def test_a_vanished_consumer_is_refused_before_anything_is_made(core: Core) -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    with pytest.raises(ConsumerGone):
        core.handle(Request(core.lab.ifname_a, 1, consumer_pid=child))
    assert core.service.loader.attachments == {}


def test_detach_refuses_live_leases_unless_forced(core: Core) -> None:
    core.granted(Request(core.lab.ifname_a, 1, umem_bytes=1 << 20))
    with pytest.raises(LeasesLive, match="1 live lease"):
        core.handle(Detach(core.lab.ifname_a))
    assert core.handle(Detach(core.lab.ifname_a, force=True)) == Done(
        Detached(core.lab.ifname_a, True)
    )
    assert core.service.leases.by_id == {} and core.service.loader.attachments == {}


def test_status_and_ping(core: Core) -> None:
    core.granted(Request(core.lab.ifname_a, 1, umem_bytes=1 << 20))
    status = core.handle(StatusQuery())
    assert isinstance(status, Done) and isinstance(status.reply, Status)
    assert [a.ifname for a in status.reply.attachments] == [core.lab.ifname_a]
    assert status.reply.lease_count == 1
    pong = core.handle(Ping())
    assert isinstance(pong, Done) and isinstance(pong.reply, Pong) and pong.reply.pid == os.getpid()


def test_polkit_delegation_waits_then_hands_out_or_refuses_cleanly(
    lab4: VethLab, pin_root: Path, tmp_path: Path
) -> None:
    before = open_fds()
    core = make_core(lab4, pin_root, tmp_path, POLKIT_POLICY)
    request = Request(lab4.ifname_a, 1, umem_bytes=1 << 20)
    waiting = core.handle(request)
    assert isinstance(waiting, NeedsPolkit) and waiting.action == "org.xsk-broker.request"
    assert waiting.details["interface"] == lab4.ifname_a
    assert core.service.loader.attachments == {}, "nothing is attached before polkit agrees"
    with pytest.raises(Denied, match="polkit says no"):
        core.call(lambda: waiting.resume(Denied("polkit says no")))
    assert core.service.leases.by_id == {}
    again = core.handle(request)
    assert isinstance(again, NeedsPolkit)
    done = core.call(lambda: again.resume(None))
    for fd in done.fds:
        os.close(fd)
    assert isinstance(done.reply, Granted) and core.ports.watched
    revoke = core.handle(Revoke(done.reply.lease.lease_id))
    assert isinstance(revoke, NeedsPolkit) and revoke.details["op"] == "revoke"
    assert isinstance(core.call(lambda: revoke.resume(None)).reply, Revoked)
    core.service.close()
    os.close(core.caller.pidfd)
    assert open_fds() <= before, "a refused or resumed polkit check leaked fds"


def test_an_abandoned_polkit_check_closes_what_it_held(
    lab4: VethLab, pin_root: Path, tmp_path: Path
) -> None:
    """The client left, or the broker stops, while polkit was being asked."""
    before = open_fds()
    core = make_core(lab4, pin_root, tmp_path, POLKIT_POLICY)
    waiting = core.handle(Request(lab4.ifname_a, 1, umem_bytes=1 << 20))
    assert isinstance(waiting, NeedsPolkit)
    waiting.abandon()
    assert core.service.leases.by_id == {} and core.service.loader.attachments == {}
    core.service.close()
    os.close(core.caller.pidfd)
    assert open_fds() <= before


def test_a_consumer_that_exits_while_polkit_is_asked_gets_nothing(
    lab4: VethLab, pin_root: Path, tmp_path: Path, spawn: Spawn
) -> None:
    """The consumer exits (its pid perhaps reused) while the check waits: polkit's yes
    then grants nothing, makes nothing, and the held pidfd is closed."""
    before = open_fds()
    core = make_core(lab4, pin_root, tmp_path, POLKIT_POLICY)
    consumer = spawn()
    waiting = core.handle(Request(lab4.ifname_a, 1, umem_bytes=1 << 20, consumer_pid=consumer.pid))
    assert isinstance(waiting, NeedsPolkit)
    consumer.kill()
    consumer.wait()
    with pytest.raises(ConsumerGone):
        core.call(lambda: waiting.resume(None))
    assert core.service.leases.by_id == {} and core.service.loader.attachments == {}
    assert not core.ports.watched
    core.service.close()
    os.close(core.caller.pidfd)
    assert open_fds() <= before, "the waiting consumer's pidfd leaked"


def test_an_admin_op_is_authorized_again_after_polkit(
    lab4: VethLab, pin_root: Path, tmp_path: Path
) -> None:
    """A SIGHUP that took admin away while polkit was asked wins over polkit's yes."""
    core = make_core(lab4, pin_root, tmp_path, POLKIT_POLICY)
    try:
        done = core.call(lambda: core.handle(Request(lab4.ifname_a, 1, umem_bytes=1 << 20)))
        assert isinstance(done, NeedsPolkit)
        granted = core.call(lambda: done.resume(None))
        for fd in granted.fds:
            os.close(fd)
        assert isinstance(granted.reply, Granted)
        revoke = core.handle(Revoke(granted.reply.lease.lease_id))
        assert isinstance(revoke, NeedsPolkit)
        core.service.policy_path.write_text(POLKIT_POLICY.replace("admin = true\n", ""))
        core.service.reload_policy()
        with pytest.raises(Denied, match="admin = true for revoke"):
            core.call(lambda: revoke.resume(None))
        assert len(core.service.leases.by_id) == 1
    finally:
        core.service.close()
        os.close(core.caller.pidfd)


def test_status_lists_no_more_leases_than_fit_one_datagram(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON front end trims status to its datagram; the core's lease_count keeps the
    total. The datagram limit is lowered so that two of four leases fit to the byte."""
    for queue in range(4):
        core.granted(Request(core.lab.ifname_a, 1, queue, tag="t" * 64, umem_bytes=1 << 20))
    status = core.service.status(core.caller, StatusQuery())
    assert len(status.leases) == 4
    two = len(encode_reply(dataclasses.replace(status, leases=status.leases[:2])))
    monkeypatch.setattr("broker.jsonfront.MAX_MESSAGE_BYTES", two)
    answer = JsonFrontEnd(core.service).handle(core.caller, encode_message(StatusQuery()))
    assert isinstance(answer, Answer) and len(answer.data) == two
    shown = decode_reply(answer.data, StatusQuery)
    assert isinstance(shown, Status) and (len(shown.leases), shown.lease_count) == (2, 4)
