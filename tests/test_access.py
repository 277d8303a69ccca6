"""Access control through a running broker: policy, polkit, locked memory, no stealing.

The callers are real processes of other uids; the socket's group (61000) only lets them
connect, and the policy decides. Group 61100 is given as a supplementary group only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from polkit_env import PolkitEnv, polkit_env
from support import BrokerFactory, actor, xdp_of, xsk_cli

from lab.brokerproc import REPO, BrokerProcess, wait_until
from lab.netlab import VethLab, run_unprivileged, spawn_unprivileged
from lab.traffic import Capture, client_env, running_probe, send_to_queue

pytestmark = pytest.mark.kernel
MIB = 1 << 20
TENANTS = 61100

POLICY = f"""
[[deny]]
name = "quarantine"
users = [61009]

[[allow]]
name = "tenants"
groups = [{TENANTS}]
queues = ["0-1"]
max_queues_per_uid = 2

[[allow]]
name = "everyone-on-queue-3"
users = ["*"]
queues = [3]

[[allow]]
name = "root"
users = [0]
admin = true
"""


def ask_as(
    broker: BrokerProcess, uid: int, groups: Sequence[int] = (), /, **args: object
) -> dict[str, Any]:
    """One request (or revoke) from a fresh process of uid, with supplementary groups."""
    result = run_unprivileged(
        actor("ask", json.dumps(args)),
        uid,
        extra_groups=groups,
        netns=broker.netns,
        env=client_env(broker),
        cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


@pytest.fixture
def guarded(broker_factory: BrokerFactory) -> tuple[BrokerProcess, VethLab]:
    return broker_factory(policy=POLICY)


def test_policy_decides_who_gets_which_queues(guarded: tuple[BrokerProcess, VethLab]) -> None:
    broker, lab = guarded
    small = {"ifname": lab.ifname_a, "umem_bytes": MIB}
    assert ask_as(broker, 61001, [TENANTS], queues=2, **small) == {"ok": True, "queues": [0, 1]}
    outsider = ask_as(broker, 61002, queues=1, **small)
    assert outsider["code"] == "DENIED"
    assert "uid 61002" in outsider["message"] and "queues 0-0" in outsider["message"]
    assert ask_as(broker, 61002, queues=1, start_queue=3, **small)["ok"]
    quarantined = ask_as(broker, 61009, [TENANTS], queues=1, **small)
    assert quarantined["code"] == "DENIED"
    assert quarantined["message"].startswith("deny rule 'quarantine'")
    beyond = ask_as(broker, 61001, [TENANTS], queues=1, start_queue=2, **small)
    assert beyond["code"] == "DENIED" and "tenants" in beyond["message"]


def test_per_uid_queue_limit_counts_live_leases(guarded: tuple[BrokerProcess, VethLab]) -> None:
    broker, lab = guarded
    with running_probe(broker, lab.ifname_a, 1, uid=61001, extra_groups=[TENANTS]):
        more = ask_as(broker, 61001, [TENANTS], ifname=lab.ifname_a, queues=2, umem_bytes=MIB)
        assert more["code"] == "DENIED" and "tenants" in more["message"], more
        one = ask_as(broker, 61001, [TENANTS], ifname=lab.ifname_a, queues=1, start_queue=1,
                     umem_bytes=MIB)  # fmt: skip
        assert one["ok"], one


def test_broken_reload_keeps_the_old_policy_and_a_good_one_takes_over_without_ending_leases(
    guarded: tuple[BrokerProcess, VethLab],
) -> None:
    broker, lab = guarded
    proc = broker.proc
    assert proc is not None  # the fixture started it
    small = {"ifname": lab.ifname_a, "queues": 1, "umem_bytes": MIB}
    broker.policy_path.write_text(POLICY + "\n[[allow]]\nname = 'x'\nqueues = 'not a list'\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "policy reload refused" in broker.log())
    assert "policy.toml:" in broker.log().split("policy reload refused")[1].splitlines()[0]
    assert ask_as(broker, 61001, [TENANTS], **small)["ok"]
    with running_probe(broker, lab.ifname_a, 1, "--tag", "kept", uid=61001,
                       extra_groups=[TENANTS]):  # fmt: skip
        broker.policy_path.write_text(POLICY.replace(f"groups = [{TENANTS}]", "groups = [61999]"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "policy reloaded" in broker.log())
        small["start_queue"] = 1
        assert ask_as(broker, 61001, [TENANTS], **small)["code"] == "DENIED"
        (kept,) = broker.client().status().leases
        assert kept.tag == "kept", "a reload must never end a lease"


def test_memlock_budget_is_checked_before_anything_is_made(
    guarded: tuple[BrokerProcess, VethLab],
) -> None:
    broker, lab = guarded
    baseline = broker.quiet_fd_count()
    too_big = ask_as(broker, 61001, [TENANTS], ifname=lab.ifname_a, queues=1)
    assert too_big["code"] == "MEMLOCK"
    assert "is 8 MiB; this lease needs 32 MiB" in too_big["message"]
    assert "LimitMEMLOCK=" in too_big["message"] and "CAP_IPC_LOCK" in too_big["message"]
    assert xdp_of(lab) == {}, "a refused request must not attach anything"
    assert broker.settled_fd_count(baseline) == baseline
    with running_probe(broker, lab.ifname_a, 1, "--frames", "1280", uid=61001,
                       extra_groups=[TENANTS]):  # fmt: skip
        second = ask_as(broker, 61001, [TENANTS], ifname=lab.ifname_a, queues=1, start_queue=1,
                        umem_bytes=5 * MIB)  # fmt: skip
        assert second["code"] == "MEMLOCK", second
        assert "needs 5 MiB and uid 61001 already holds 5 MiB" in second["message"], second
        fits = ask_as(broker, 61001, [TENANTS], ifname=lab.ifname_a, queues=1, start_queue=1,
                      umem_bytes=2 * MIB)  # fmt: skip
        assert fits["ok"], fits
    with broker.client().request(lab.ifname_a, 4) as lease:  # root holds CAP_IPC_LOCK
        assert len(lease.fds) == 4 and lease.info.umem_bytes == 32 * MIB


def test_nobody_takes_what_is_not_theirs(guarded: tuple[BrokerProcess, VethLab]) -> None:
    broker, lab = guarded
    with running_probe(broker, lab.ifname_a, 1, "--tag", "vm7", uid=61001,
                       extra_groups=[TENANTS]) as probe:  # fmt: skip
        (lease,) = broker.client().status().leases
        stolen = ask_as(broker, 61001, [TENANTS], ifname=lab.ifname_a, queues=1,
                        umem_bytes=MIB)  # fmt: skip
        assert stolen["code"] == "QUEUE_BUSY"
        assert f"leased to pid {probe.proc.pid} (uid 61001, tag vm7" in stolen["message"]
        foreign = ask_as(broker, 61002, ifname=lab.ifname_a, queues=1, start_queue=3,
                         umem_bytes=MIB, consumer_pid=os.getpid())  # fmt: skip
        assert foreign["code"] == "DENIED" and "consumer" in foreign["message"], foreign
        revoke = ask_as(broker, 61002, revoke=lease.lease_id)
        assert revoke["code"] == "DENIED" and "admin = true for revoke" in revoke["message"]
        with Capture(lab.a) as stack:
            send_to_queue(lab.b, lab.a, 0, "while leased", 4)
            assert stack.frames(0.5) == []
            broker.client().revoke(lease.lease_id)
            send_to_queue(lab.b, lab.a, 0, "after revoke", 4)
            assert len(stack.frames(10.0, want=4)) == 4
    assert "event=revoked" in broker.log()


POLKIT_RULES = """
polkit.addRule(function(action, subject) {
    if (action.id == "org.xsk-broker.request" && subject.isInGroup("xsk-users")) {
        return polkit.Result.YES;
    }
});
"""


@pytest.fixture(scope="module")
def polkitd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolkitEnv]:
    rules = tmp_path_factory.mktemp("rules") / "50-test.rules"
    rules.write_text(POLKIT_RULES)
    with polkit_env(rules) as env:
        yield env


def test_polkit_decides_where_the_policy_delegates(
    broker_factory: BrokerFactory, polkitd: PolkitEnv
) -> None:
    policy = '[[allow]]\nname = "via-polkit"\nusers = ["*"]\npolkit = true\n'
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": polkitd.bus_address}
    broker, lab = broker_factory(policy=policy, env=env)
    small = {"ifname": lab.ifname_a, "queues": 1, "umem_bytes": MIB}
    assert ask_as(broker, 61001, **small)["ok"]  # 61001 is in xsk-users for polkit
    other = ask_as(broker, 61002, **small)
    assert other["code"] == "DENIED" and "polkit" in other["message"], other
    polkitd.stop_polkitd()
    try:
        gone = ask_as(broker, 61001, **small)
        assert gone["code"] == "DENIED"
        assert "polkit is unreachable" in gone["message"], gone
        assert broker.client().ping().broker, "the loop must not hang on polkit"
    finally:
        polkitd.start_polkitd()


def test_policy_check_command_explains_a_user(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    ok = xsk_cli("policy", "check", str(path), "--as", "root")
    assert ok.returncode == 0, ok.stderr
    assert "root" in ok.stdout
    path.write_text('[[allow]]\nname = "x"\nusers = ["*"]\nqueues = "all"\n')
    broken = xsk_cli("policy", "check", str(path))
    assert broken.returncode == 1
    assert broken.stderr.startswith(f"BAD_POLICY: {path}:4: ")


def test_waiting_polkit_checks_are_bounded_per_uid(
    broker_factory: BrokerFactory, polkitd: PolkitEnv
) -> None:
    """With polkitd stopped, checks wait; a uid gets two waiting, not more, and others
    are still served."""
    policy = '[[allow]]\nname = "via-polkit"\nusers = [61001]\npolkit = true\n' + POLICY
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": polkitd.bus_address}
    broker, lab = broker_factory(policy=policy, env=env)
    args = json.dumps({"ifname": lab.ifname_a, "queues": 1, "umem_bytes": MIB})
    assert polkitd.polkitd is not None
    polkitd.polkitd.send_signal(signal.SIGSTOP)
    waiting = []
    threads = len(os.listdir(f"/proc/{broker.pid}/task"))
    try:
        for _ in range(2):
            waiting.append(spawn_unprivileged(
                actor("ask", args), 61001, netns=broker.netns,
                env=client_env(broker), cwd=str(REPO), stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip
        # Both have asked and wait on polkitd: each waiting check holds a worker thread of
        # its own (the broker's pool starts one for a check while the others are busy).
        wait_until(lambda: len(os.listdir(f"/proc/{broker.pid}/task")) == threads + 2)
        third = ask_as(broker, 61001, ifname=lab.ifname_a, queues=1, umem_bytes=MIB)
        assert third["code"] == "RATE_LIMITED", third
        assert "uid 61001 already has 2 polkit checks waiting" in third["message"]
        assert broker.client().ping().broker
    finally:
        polkitd.polkitd.send_signal(signal.SIGCONT)
        for proc in waiting:
            proc.communicate(timeout=30)
