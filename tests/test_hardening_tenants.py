"""Tenants against each other and against the broker's records (issue 10, findings 3-6):
status serves every tenant whatever the others hold, client text never forges a log line
or a QEMU argument, a rule bounds the memory the broker raises a limit to, and exclusive
tenancy keeps other uids off a leased interface (and what it cannot prevent: squatting).

The tenants are real processes of other uids (tests/actors/tenant.py) against a real broker.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
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
    xdp_of,
    xsk_cli,
)

from broker.errors import Denied, MemlockExceeded, QueueBusy
from broker.protocol import MAX_MESSAGE_BYTES, MAX_TAG_CHARS, LeaseInfo
from client.aio import AsyncClient
from client.cli import substitute
from client.lease import Lease
from lab.brokerproc import LAB_POLICY, REPO, BrokerProcess, wait_until
from lab.netlab import VethLab, run, run_unprivileged
from lab.traffic import client_env

MIB = 1 << 20
SHARED = "exclusive_tenancy = false\n" + LAB_POLICY


def cli_as(broker: BrokerProcess, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return run_unprivileged(
        [sys.executable, "-m", "xsk_broker", *args], uid,
        netns=broker.netns, env=client_env(broker), cwd=str(REPO),
    )  # fmt: skip


# --- 3: status ------------------------------------------------------------------------


@pytest.fixture
def crowded(pin_root: Path, workdir: Path) -> Iterator[tuple[BrokerProcess, VethLab]]:
    """A broker on a 96-queue veth, for 90 one-queue leases of three tenants."""
    with (
        VethLab(queues=96) as lab,
        BrokerProcess(lab.ns_a, pin_root, workdir, policy=SHARED) as broker,
    ):
        yield broker, lab


@pytest.mark.kernel
def test_status_serves_every_tenant_despite_long_tags_and_filters_what_each_sees(
    crowded: tuple[BrokerProcess, VethLab],
) -> None:
    """90 leases with 64-emoji tags (about 1 KiB each as JSON) cannot fit one datagram:
    root's status lists what fits and counts the rest; a tenant sees its own 30 leases,
    and --lease, --ifname and --uid narrow what is shown, with what was left out counted.
    A refusal naming the holders names a few and counts the rest, so it fits too."""
    broker, lab = crowded
    uids = (61001, 61002, 61003)
    with tenants(broker, *uids) as crowd:
        ids = {
            tenant.uid: tenant.leases(lab.ifname_a, *range(30 * n, 30 * n + 30),
                                      tag="\N{GRINNING FACE}" * MAX_TAG_CHARS, umem_bytes=4096)
            for n, tenant in enumerate(crowd)
        }  # fmt: skip

        root = xsk_cli("status", "--json", "--socket", str(broker.socket_path))
        assert root.returncode == 0, root.stderr
        every = json.loads(root.stdout)
        shown = len(every["leases"])
        assert (every["lease_count"], every["leases_filtered"]) == (90, 0)
        assert 0 < shown < 90 and every["leases_trimmed"] == 90 - shown
        assert len(json.dumps(every, separators=(",", ":"))) < MAX_MESSAGE_BYTES

        own = crowd[0].ask(status={})
        assert [x["lease_id"] for x in own["leases"]] == ids[61001]
        assert (own["lease_count"], own["leases_filtered"], own["leases_trimmed"]) == (90, 60, 0)
        text = cli_as(broker, 61002, "status")
        assert text.returncode == 0, text.stderr
        assert sum(lease_id in text.stdout for lease_id in ids[61002]) == 30
        assert not any(lease_id in text.stdout for lease_id in ids[61001])
        assert "30 of 90 lease(s) shown: 60 not yours or not matching the filters" in text.stdout

        mine = ids[61002][7]
        one = cli_as(broker, 61002, "status", "--lease", mine, "--ifname", lab.ifname_a, "--json")
        assert one.returncode == 0, one.stderr
        body = json.loads(one.stdout)
        assert [x["lease_id"] for x in body["leases"]] == [mine]
        assert (body["leases_filtered"], body["leases_trimmed"]) == (89, 0)
        theirs = crowd[0].ask(status={"lease_id": mine})
        assert (theirs["leases"], theirs["leases_filtered"]) == ([], 90)
        elsewhere = crowd[0].ask(status={"ifname": "lo"})
        assert (elsewhere["leases"], elsewhere["attachments"]) == ([], [])

        picked = asyncio.run(AsyncClient(broker.socket_path).status(uid=61003))
        assert [x.lease_id for x in picked.leases] == ids[61003]
        assert (picked.leases_filtered, picked.leases_trimmed) == (60, 0)
        refused = cli_as(broker, 61001, "status", "--lease", "not-a-lease")
        assert refused.returncode == 1 and refused.stderr.startswith("BAD_REQUEST: lease_id")

        with pytest.raises(QueueBusy) as busy:  # naming all 90 holders would not fit a reply
            broker.client().request(lab.ifname_a, 90, umem_bytes=4096)
        assert busy.value.message.endswith("; and 86 more"), busy.value.message[-200:]


# --- 4: client text in logs, errors and QEMU arguments ----------------------------------

HOSTILE = {
    "newline": "\n",
    "carriage return": "\r",
    "escape": "\x1b[2J",
    "nul": "\x00",
    "bidi override": "\u202e",
    "lone surrogate": "\ud800",
    "line separator": "\u2028",
}
FORGED = "1999-01-01 00:00:00,000 INFO xsk-broker: FORGED granted lease 0123456789ab"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def hostile_datagrams(char: str) -> list[str]:
    """Every place a client can put text: field names, op, ifname, tag, lease id, filters."""
    text = f"x{char}{FORGED}"
    bodies: list[dict[str, Any]] = [
        {"version": 1, "op": "ping", text: 1},
        {"version": 1, "op": "request", "ifname": "eth0", "queues": 1, text: 1, f"y{char}": 2},
        {"version": 1, "op": text},
        {"version": 1, "op": "request", "ifname": f"x{char}y", "queues": 1},
        {"version": 1, "op": "request", "ifname": "lo", "queues": 1, "tag": text[:40]},
        {"version": 1, "op": "release", "lease_id": text},
        {"version": 1, "op": "status", "ifname": f"x{char}y"},
    ]
    return [json.dumps(body) for body in bodies]


@pytest.mark.kernel
def test_client_text_never_forges_colours_or_splits_a_log_line_or_an_error(
    broker_factory: BrokerFactory,
) -> None:
    """Each hostile character, in every field a client controls, reaches the reply and the
    log (at debug level, where every refusal is logged) only as its escape."""
    broker, _ = broker_factory("-v")
    datagrams = [d for char in HOSTILE.values() for d in hostile_datagrams(char)]
    sent = run_unprivileged(
        actor("raw_send", json.dumps(datagrams)), 61001,
        netns=broker.netns, env=client_env(broker), cwd=str(REPO),
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    replies = json.loads(sent.stdout)
    assert len(replies) == len(datagrams) and not any(reply["ok"] for reply in replies)
    for reply in replies:
        assert reply["error"]["message"].isprintable(), reply
    firsts = replies[:: len(replies) // len(HOSTILE)]  # the ping with a hostile field name
    for (name, char), first in zip(HOSTILE.items(), firsts, strict=True):
        assert f"'x{repr(char)[1:-1]}1999-01-01" in first["error"]["message"], (name, first)

    wait_until(lambda: broker.log().count("refused uid=61001") >= len(datagrams))
    raw = broker.log_path.read_bytes().decode("utf-8")  # a lone surrogate cannot be in it
    lines = raw.split("\n")
    assert not any(char in raw for char in "\r\x1b\x00\u202e\u2028"), "raw control text"
    assert all(RECORD.match(line) for line in lines if line), [
        line for line in lines if line and not RECORD.match(line)
    ]
    assert "x\\n1999-01-01 00:00:00,000 INFO xsk-broker: FORGED" in raw
    assert "x\\ud8001999" in raw and "x\\x1b[2J1999" in raw


def lease_of(ifname: str, fds: list[int], mode: str = "native") -> Lease:
    return Lease(LeaseInfo("0123456789ab", ifname, 7, list(range(len(fds))), mode), fds)


PLACEHOLDERS = ("{netdev}", "{sock-fds}")


@pytest.mark.parametrize("inside", PLACEHOLDERS)
@pytest.mark.parametrize("where", ["ifname", "netdev id"])
def test_placeholders_are_substituted_once_whatever_the_values_contain(
    inside: str, where: str
) -> None:
    """Every placeholder inside every value that is put in: what was put in is final."""
    ifname = f"x{inside}" if where == "ifname" else "eth1"
    netdev_id = f"n{inside}" if where == "netdev id" else "net0"
    lease = lease_of(ifname, [5, 6])
    netdev = (
        f"af-xdp,id={netdev_id},ifname={ifname},mode=native,queues=2,start-queue=0,"
        "inhibit=on,sock-fds=5:6"
    )
    args = ["-netdev", "{netdev}", "{sock-fds}", "a{netdev}b{sock-fds}c", "{{netdev}}"]
    assert substitute(args, lease, netdev_id) == [
        "-netdev", netdev, "5:6", f"a{netdev}b5:6c", f"{{{netdev}}}",
    ]  # fmt: skip


@pytest.mark.kernel
def test_an_interface_named_like_a_placeholder_reaches_qemu_as_named(
    broker_factory: BrokerFactory,
) -> None:
    """`xsk-broker request --ifname 'xskt-{sock-fds}' --id '{netdev}' -- CMD {netdev}`: the
    interface and the id stay as they are in the argument the command gets."""
    broker, lab = broker_factory()
    ifname = "xskt-{sock-fds}"
    run(["ip", "-n", lab.ns_a, "link", "add", ifname, "type", "veth", "peer", "xskt-{netdev}"])
    run(["ip", "-n", lab.ns_a, "link", "set", ifname, "up"])
    done = xsk_cli(
        "request", "--socket", str(broker.socket_path), "--ifname", ifname, "--queues", "1",
        "--umem-bytes", "4096", "--id", "{netdev}", "--", "echo", "{netdev}", "{sock-fds}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    netdev, fds = done.stdout.split()
    assert fds.isdigit()
    assert re.fullmatch(
        r"af-xdp,id=\{netdev\},ifname=xskt-\{sock-fds\},mode=(native|skb),queues=1,"
        rf"start-queue=0,inhibit=on,sock-fds={fds}",
        netdev,
    ), netdev


# --- 5: what a rule may make the broker do ----------------------------------------------


@pytest.mark.kernel
def test_raise_memlock_is_bounded_by_the_rules_umem_per_queue(
    broker_factory: BrokerFactory, spawn: Spawn
) -> None:
    """A consumer without CAP_IPC_LOCK, limit 1 MiB (hard 8 MiB). 2^40 bytes per queue is
    refused by the rule before the broker touches anything; 2 x 3 MiB is raised to 6 MiB;
    after a reload to 1 MiB per queue, a lease that would need 7 MiB is refused rather than
    raised beyond 3 queues x 1 MiB."""
    broker, lab = broker_factory(policy=RAISING_POLICY)
    consumer = capless_consumer(spawn, MIB, 8 * MIB)
    client = broker.client()
    baseline = broker.quiet_fd_count()

    with pytest.raises(Denied) as huge:
        client.request(lab.ifname_a, 1, umem_bytes=1 << 40, consumer_pid=consumer.pid)
    assert "umem_bytes 1099511627776 exceed its max_umem_bytes_per_queue 4194304" in str(huge.value)
    assert memlock_of(consumer.pid) == (MIB, 8 * MIB)
    assert xdp_of(lab) == {} and broker.settled_fd_count(baseline) == baseline

    with client.request(lab.ifname_a, 2, umem_bytes=3 * MIB, consumer_pid=consumer.pid):
        assert memlock_of(consumer.pid) == (6 * MIB, 8 * MIB)

    broker.policy_path.write_text(RAISING_POLICY.replace("4194304", str(MIB)))
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "policy reloaded" in broker.log())
    with pytest.raises(MemlockExceeded) as beyond:
        client.request(lab.ifname_a, 1, start_queue=2, umem_bytes=MIB, consumer_pid=consumer.pid)
    assert "it would need 7 MiB, beyond the 3 MiB" in str(beyond.value)
    assert memlock_of(consumer.pid) == (6 * MIB, 8 * MIB)


def policy_check(path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`xsk-broker policy check PATH ARGS` once path holds text."""
    path.write_text(text)
    return xsk_cli("policy", "check", str(path), *args)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("max_umem_bytes_per_queue = 0", "max_umem_bytes_per_queue: must be bytes in 4096..2^40"),
        ("max_umem_bytes_per_queue = 2199023255552", "must be bytes in 4096..2^40"),
        ('max_umem_bytes_per_queue = "64M"', "must be bytes in 4096..2^40, got '64M'"),
    ],
)
def test_policy_check_refuses_a_bad_umem_maximum(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "policy.toml"
    done = policy_check(path, f'[[allow]]\nname = "x"\nusers = ["*"]\n{text}\n')
    assert done.returncode == 1
    assert done.stderr.startswith(f"BAD_POLICY: {path}:4: allow rule: ") and reason in done.stderr


def test_policy_check_explains_the_umem_maximum_and_tenancy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    explained = policy_check(path, RAISING_POLICY, "--as", "root")
    assert explained.returncode == 0, explained.stderr
    assert "at most 4194304 bytes of UMEM per queue" in explained.stdout
    assert "exclusive tenancy: on" in explained.stdout
    shared = policy_check(path, "exclusive_tenancy = false\n" + RAISING_POLICY, "--json")
    assert json.loads(shared.stdout)["exclusive_tenancy"] is False
    (tmp_path / "more.toml").write_text("exclusive_tenancy = true\n")
    nested = policy_check(path, 'include = ["more.toml"]\n' + RAISING_POLICY)
    assert nested.returncode == 1
    assert "more.toml:1: exclusive_tenancy may be set only in the top policy file" in (
        nested.stderr
    )
    wrong = policy_check(path, 'exclusive_tenancy = "yes"\n' + RAISING_POLICY)
    assert "exclusive_tenancy must be true or false" in wrong.stderr


# --- 6: tenants sharing an interface --------------------------------------------------


@pytest.mark.kernel
def test_a_consumer_can_squat_another_queue_of_a_shared_interface(
    broker_factory: BrokerFactory,
) -> None:
    """The residual risk that exclusive tenancy narrows (docs/security.md): SO_BINDTODEVICE
    locks the device, not the queue, so a socket leased for queue 0 binds queue 1, and
    keeps it after its lease ended; the next tenant of queue 1 then cannot bind."""
    broker, lab = broker_factory(policy=SHARED)
    with tenants(broker, 61001, 61002) as (squatter, victim):
        (taken,) = squatter.leases(lab.ifname_a, 0)
        assert squatter.ask(bind=[taken, 0, 1]) == {"bound": 1}
        assert squatter.ask(release=taken) == {"released": taken}
        (wanted,) = victim.leases(lab.ifname_a, 1)
        assert victim.ask(bind=[wanted, 0, 1]) == {"errno": "EBUSY"}


@pytest.mark.kernel
def test_exclusive_tenancy_keeps_other_uids_off_a_leased_interface_until_its_leases_end(
    broker_factory: BrokerFactory,
) -> None:
    """The default policy: while uid 61001 holds a lease on the interface, uid 61002 is
    refused any queue of it, with the holder named; the same uid is not; once the holder's
    lease ended (its consumer exited), 61002 is admitted."""
    broker, lab = broker_factory()
    with tenants(broker, 61001, 61002) as (first, second):
        (held,) = first.leases(lab.ifname_a, 0, tag="vm-a")
        refused = second.ask(lease=[{"ifname": lab.ifname_a, "queues": 1, "start_queue": 1,
                                     "umem_bytes": MIB}])  # fmt: skip
        assert refused["code"] == "INTERFACE_TAKEN", refused
        assert f"leased to consumer uid 61001 (lease {held}, tag 'vm-a'" in refused["message"]
        assert "exclusive_tenancy" in refused["message"]
        assert first.leases(lab.ifname_a, 1)  # the same uid may take more
        first.exit()
        wait_until(lambda: broker.client().status().leases == [])
        assert second.leases(lab.ifname_a, 1)
    assert "event=denied" in broker.log() and "code=INTERFACE_TAKEN" in broker.log()
