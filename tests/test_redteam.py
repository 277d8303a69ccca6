"""A hostile review of the privilege boundary beyond issue 10's findings: what a local user
of another uid, or a consumer granted a lease, can make of identities, namespaces and the
sockets it holds. Each test runs a real broker and real actors of other uids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import (
    RAISING_POLICY,
    BrokerFactory,
    Spawn,
    actor,
    capless_consumer,
    memlock_of,
    tenants,
    wait_until,
    xdp_of,
)

from broker import procinfo
from broker.errors import BadQueues, ModeUnsupported
from client.exchange import BROKER_UID_ENV
from lab.brokerproc import LAB_POLICY, REPO, BrokerProcess
from lab.netlab import netns_path, run, run_unprivileged, spawn_unprivileged
from lab.traffic import client_env

MIB = 1 << 20

MANAGER_POLICY = (
    LAB_POLICY
    + """
[[allow]]
name = "manager"
users = [61001]
other_consumers = true
"""
)


def ask_as(broker: BrokerProcess, uid: int, args: dict[str, Any], *wrap: str) -> dict[str, Any]:
    """tests/actors/ask.py as uid (no capabilities), run through the wrap command if any."""
    # In a user namespace of its own, the root broker's uid shows as the overflow uid.
    env = client_env(broker) | ({BROKER_UID_ENV: "65534"} if wrap else {})
    result = run_unprivileged(
        [*wrap, *actor("ask", json.dumps(args))], uid,
        netns=broker.netns, env=env, cwd=str(REPO),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


# A rootless container's view: its own user and pid namespaces (no privilege needed), in
# which the asking process is pid 1.
IN_PID_NAMESPACE = ("unshare", "--user", "--map-current-user", "--pid", "--fork", "--kill-child")


@pytest.mark.kernel
def test_consumer_pid_from_another_pid_namespace_is_refused(
    broker_factory: BrokerFactory,
) -> None:
    """A VM manager in a container names its consumer by the pid it sees; the broker read
    that number in its own namespace, and so bound the lease to another process: asking
    for "pid 1" (the manager itself, in its namespace) gave a lease consumed by the host's
    init (uid 0), which never ends, counted against uid 0. Now a consumer_pid from a caller
    in another pid namespace is refused, before anything is attached."""
    broker, lab = broker_factory(policy=MANAGER_POLICY)
    request = {"ifname": lab.ifname_a, "queues": 1, "umem_bytes": 4096, "consumer_pid": 1}
    reply = ask_as(broker, 61001, request, *IN_PID_NAMESPACE)
    assert reply["ok"] is False, f"granted to the host's pid 1: {reply}"
    assert reply["code"] == "BAD_REQUEST", reply
    assert "another pid namespace" in reply["message"], reply
    status = broker.client().status()
    assert status.lease_count == 0
    assert xdp_of(lab) == {}

    # From the broker's namespace the same manager may still name its consumer.
    vm = spawn_unprivileged(["sleep", "600"], 61001, netns=broker.netns)
    try:
        assert ask_as(broker, 61001, request | {"consumer_pid": vm.pid})["ok"] is True
        # And in a container, a caller that is its own consumer is unaffected.
        own = {"ifname": lab.ifname_a, "queues": 1, "start_queue": 1, "umem_bytes": 4096}
        assert ask_as(broker, 61001, own, *IN_PID_NAMESPACE)["ok"] is True
    finally:
        vm.kill()
        vm.wait()


@pytest.mark.kernel
def test_a_refused_request_leaves_the_consumers_memlock_limit_alone(
    broker_factory: BrokerFactory, spawn: Spawn
) -> None:
    """Under raise_memlock the broker raised the consumer's limit before it asked the
    interface whether the queues and the mode could be had at all: a request for a queue
    the device lacks, or for a mode other than the attachment's, was refused with the
    consumer's limit left raised (1 MiB -> 3 MiB). Refusals change nothing."""
    broker, lab = broker_factory(policy=RAISING_POLICY)
    consumer = capless_consumer(spawn, MIB, 8 * MIB)
    client = broker.client()
    ask = {"umem_bytes": 3 * MIB, "consumer_pid": consumer.pid}

    with pytest.raises(BadQueues):
        client.request(lab.ifname_a, 1, start_queue=4, **ask)
    assert memlock_of(consumer.pid) == (MIB, 8 * MIB)
    assert xdp_of(lab) == {}

    with client.request(lab.ifname_a, 1, umem_bytes=4096) as attached:
        other = "skb" if attached.mode == "native" else "native"
        with pytest.raises(ModeUnsupported):
            client.request(lab.ifname_a, 1, start_queue=1, mode=other, **ask)
        assert memlock_of(consumer.pid) == (MIB, 8 * MIB)
        with client.request(lab.ifname_a, 1, start_queue=1, **ask):  # uid 0 holds 4 KiB too
            assert memlock_of(consumer.pid) == (3 * MIB + 4096, 8 * MIB)


@pytest.mark.kernel
def test_a_socket_of_an_ended_lease_binds_its_interface_when_the_interface_returns(
    broker_factory: BrokerFactory,
) -> None:
    """A residual risk the broker cannot close (docs/security.md): SO_BINDTODEVICE keeps
    an ifindex, not a device. The interface leaves the broker's namespace (the lease ends
    with it) and comes back with the same ifindex (a move keeps a free ifindex, and `ip
    link add ... index N` picks one): the former tenant's socket, never bound while
    leased, now binds it, although no lease covers it, and exclusive tenancy, seeing no
    live lease, admits the next uid, whose bind of that queue is refused."""
    broker, lab = broker_factory()
    away = lab.name + "t"
    run(["ip", "netns", "add", away])
    try:
        with tenants(broker, 61001, 61002) as (former, following):
            (stale,) = former.leases(lab.ifname_a, 0)
            run(["ip", "-n", lab.ns_a, "link", "set", lab.ifname_a, "netns", away])
            wait_until(lambda: broker.client().status().lease_count == 0)
            run(["ip", "-n", away, "link", "set", lab.ifname_a, "netns", lab.ns_a])
            run(["ip", "-n", lab.ns_a, "link", "set", lab.ifname_a, "up"])
            (link,) = json.loads(run(["ip", "-n", lab.ns_a, "-j", "link", "show", lab.ifname_a]))
            assert link["ifindex"] == lab.a.ifindex

            assert former.ask(bind=[stale, 0, 0]) == {"bound": 0}
            (wanted,) = following.leases(lab.ifname_a, 0)
            assert following.ask(bind=[wanted, 0, 0]) == {"errno": "EBUSY"}
    finally:
        if netns_path(away).exists():
            run(["ip", "netns", "delete", away])


# An unprivileged user's own user namespace, in which it is root with every capability.
AS_NAMESPACE_ROOT = ("unshare", "--user", "--map-root-user")


@pytest.mark.kernel
def test_capabilities_in_a_user_namespace_do_not_pass_the_memlock_check(
    broker_factory: BrokerFactory,
) -> None:
    """/proc/PID/status shows a process's capabilities in its own user namespace: any user
    can be root with CAP_IPC_LOCK in one of its own, and the broker took that for the
    kernel's exemption, so a consumer with a 1 MiB limit was granted 32 MiB of UMEM that
    the kernel (which asks the initial namespace) will refuse to register. Now only
    capabilities in the broker's user namespace count, and the request is refused."""
    broker, lab = broker_factory()
    request = {"ifname": lab.ifname_a, "queues": 1, "umem_bytes": 32 * MIB}
    limited = ("prlimit", f"--memlock={MIB}:{MIB}", "--")
    reply = ask_as(broker, 61001, request, *limited, *AS_NAMESPACE_ROOT)
    assert reply["ok"] is False, f"granted past a 1 MiB limit: {reply}"
    assert reply["code"] == "MEMLOCK", reply
    assert ask_as(broker, 61001, request | {"umem_bytes": MIB}, *limited, *AS_NAMESPACE_ROOT)["ok"]


@pytest.mark.kernel
def test_numbers_a_caller_sends_cannot_flood_the_log(broker_factory: BrokerFactory) -> None:
    """start_queue had no upper bound: 4299 digits (what the parser takes) with queues=253
    made every refusal's audit line name 253 such queue ids, about 2 MB of log for a 4 KiB
    request that any user who may open the socket can send 200 times a second. Queue ids
    are now bounded by the kernel's (u32), so such a request is BAD_QUEUES and its log
    line short."""
    broker, lab = broker_factory()
    before = broker.log_path.stat().st_size
    result = run_unprivileged(
        actor("huge_numbers", lab.ifname_a, "5"), 61002,
        netns=broker.netns, env=client_env(broker), cwd=str(REPO),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)
    assert sent["codes"] == ["BAD_QUEUES"] * 5, sent
    assert sent["reply_bytes"] < 1024
    assert broker.log_path.stat().st_size - before < 5 * 1024
    assert xdp_of(lab) == {}


@pytest.mark.kernel
def test_a_consumer_cannot_widen_its_socket_beyond_the_interface(
    broker_factory: BrokerFactory,
) -> None:
    """What a consumer of another uid, without capabilities, holding a socket the broker
    made, may change on it: not its device (neither undone nor moved, by name or index),
    nor a mark or a priority above a user's; it still binds its own queue."""
    broker, lab = broker_factory()
    env = client_env(broker) | {"IFNAME": lab.ifname_a}
    result = run_unprivileged(
        actor("socket_misuse"), 61001, netns=broker.netns, env=env, cwd=str(REPO)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "unbind_device": "EPERM",
        "bind_device_lo": "EPERM",
        "bind_ifindex_lo": "EPERM",
        "mark": "EPERM",
        "priority_7": "EPERM",
        "bound_to": lab.a.ifindex,
    }


def spawn_with_pid(spawn: Spawn, pid: int, tries: int = 500) -> subprocess.Popen[bytes]:
    """A `sleep` that has exactly pid: the kernel gives the next fork ns_last_pid + 1, unless
    another process forks in between (then try again)."""
    for _ in range(tries):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        child = spawn()
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    raise AssertionError(f"pid {pid} was not had in {tries} forks")


@pytest.mark.kernel
def test_a_journaled_lease_is_not_taken_over_by_a_process_reusing_its_consumers_pid(
    broker_factory: BrokerFactory, spawn: Spawn
) -> None:
    """The broker crashes (no fd store keeps its pidfds); meanwhile the consumer exits and
    a new process gets its pid. The restarted broker reopens the pid from the journal and
    finds another start time: the lease ended, its queue is free, and the newcomer did
    not inherit it."""
    broker, lab = broker_factory()
    consumer = spawn()
    with broker.client().request(lab.ifname_a, 1, umem_bytes=4096, consumer_pid=consumer.pid):
        pass
    broker.kill()
    consumer.kill()
    consumer.wait()
    newcomer = spawn_with_pid(spawn, consumer.pid)
    broker.start()
    client = broker.client()
    assert client.status().lease_count == 0
    assert "consumer exited while the broker was down" in broker.log()
    with client.request(lab.ifname_a, 1, umem_bytes=4096, consumer_pid=newcomer.pid) as lease:
        assert lease.queue_ids == [0]


RENAME_SELF = """
import ctypes, sys
sys.stdin.readline()
ctypes.CDLL(None).prctl(15, b"x) Z 1 1\\nUid:\\t0", 0, 0, 0)  # PR_SET_NAME, 15 bytes
print("renamed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.kernel
def test_a_process_name_cannot_forge_the_identity_the_broker_reads() -> None:
    """A consumer chooses its own name (PR_SET_NAME), which /proc shows inside status and
    stat: one holding ')', a state, numbers and a newline with a Uid line changes neither
    the uid nor the start time the broker reads."""
    child = spawn_unprivileged(
        [sys.executable, "-c", RENAME_SELF], 61001,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        started = procinfo.start_time(child.pid)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "renamed\n"
        assert "(x) Z 1 1\nUid:\t0) " in Path(f"/proc/{child.pid}/stat").read_text()
        assert procinfo.start_time(child.pid) == started
        assert procinfo.read_status(child.pid).uids == (61001,) * 4
    finally:
        child.kill()
        child.wait()


@pytest.mark.kernel
def test_the_loopback_interface_is_never_handed_out(broker_factory: BrokerFactory) -> None:
    """An allow rule that names no interfaces covers all of them, lo included: uid 61001
    was leased lo's queue, bound it, and received what root sent to a local UDP service
    (every local connection of the namespace passes lo, and its frames are taken from the
    stack), and could forge frames from 127.0.0.1. No VM needs lo: it is refused whatever
    the policy says, by its IFF_LOOPBACK flag, before anything is attached."""
    broker, _ = broker_factory()
    run(["ip", "-n", broker.netns, "link", "set", "lo", "up"])
    reply = ask_as(broker, 61001, {"ifname": "lo", "queues": 1, "umem_bytes": MIB})
    assert reply["ok"] is False, f"lo was handed out: {reply}"
    assert reply["code"] == "DENIED", reply
    assert "loopback" in reply["message"], reply
    (link,) = json.loads(run(["ip", "-n", broker.netns, "-d", "-j", "link", "show", "lo"]))
    assert "xdp" not in link


@pytest.mark.kernel
def test_a_refused_wide_request_logs_a_queue_span_not_every_queue(
    broker_factory: BrokerFactory,
) -> None:
    """A 253-queue request on a 4-queue interface names its queues as a span: its line
    used to list 253 ids in the message and twice in the fields, about 6 KB a refusal."""
    broker, lab = broker_factory()
    before = broker.log_path.stat().st_size
    with pytest.raises(BadQueues):
        broker.client().request(lab.ifname_a, 253)
    logged = broker.log_path.read_bytes()[before:].decode()
    assert "queues 0-252" in logged and "queues=0-252" in logged, logged
    assert len(logged) < 1024, logged


def _rename(netns: str, old: str, new: str) -> None:
    for args in (["down"], ["name", new], ["up"]):
        run(["ip", "-n", netns, "link", "set", "dev", old if args != ["up"] else new, *args])


@pytest.mark.kernel
def test_leases_follow_their_interfaces_new_name(broker_factory: BrokerFactory) -> None:
    """Renames were ignored: a lease kept its interface's old name, so revoke authorized an
    admin against it and status's --ifname filter missed it. Leases and the attachment now
    follow the current name, also across a broker restart (the journal records it)."""
    broker, lab = broker_factory()
    new = lab.ifname_a + "r"
    client = broker.client()
    with client.request(lab.ifname_a, 1, umem_bytes=4096) as lease:
        _rename(broker.netns, lab.ifname_a, new)
        try:
            wait_until(lambda: client.status(ifname=new).leases != [])
            assert [a.ifname for a in client.status(ifname=new).attachments] == [new]
            assert client.status(ifname=lab.ifname_a).leases == []
            assert f"renamed lease {lease.lease_id}" in broker.log()
            broker.kill()
            broker.start()
            shown = broker.client().status(ifname=new).leases
            assert [info.lease_id for info in shown] == [lease.lease_id]
        finally:
            _rename(broker.netns, new, lab.ifname_a)
