"""Map leases: the device-plugin front end DPDK's af_xdp PMD speaks (use_cni=1) and the
per-lease pinned XSKMAP (use_pinned_map=1), with a real, unmodified dpdk-testpmd (trixie's
24.11, lab/dpdk.py) run as an unprivileged uid holding only CAP_NET_RAW and CAP_IPC_LOCK.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import broker_fixture, veth_lab_fixture
from support import actor, pin_dir, run_captured, xdp_of

from broker import bpf
from broker.protocol import LeaseInfo, Request
from lab.brokerproc import LAB_POLICY, BrokerProcess, wait_until
from lab.dpdk import Dpdk, PmdRun, ensure_dpdk, pmd_args, port_stats
from lab.netlab import (
    UNPRIVILEGED_GID,
    UNPRIVILEGED_UID,
    VethLab,
    enter_netns,
    in_netns,
    run,
    steer_queue,
)
from lab.traffic import running_probe, send_to_queue

pytestmark = [pytest.mark.kernel]

OTHER_UID = UNPRIVILEGED_UID + 1
SHARED_RUNTIME = Path("/tmp/dpdk")  # EAL's runtime directory for uids without XDG_RUNTIME_DIR
CAPS = "ipc_lock,+net_raw"


def as_uid(uid: int, argv: list[str], caps: str = CAPS) -> list[str]:
    """argv as uid with only caps (ambient, bounded), no way back."""
    return [
        "setpriv", f"--reuid={uid}", f"--regid={UNPRIVILEGED_GID}", "--clear-groups",
        f"--inh-caps=-all,+{caps}", f"--ambient-caps=-all,+{caps}",
        f"--bounding-set=-all,+{caps}", "--no-new-privs", "--pdeathsig=KILL", "--", *argv,
    ]  # fmt: skip


def request_map(
    broker: BrokerProcess, ifname: str, queues: int, consumer: list[str], *extra: str
) -> list[str]:
    """`xsk-broker request --handout map ... -- CONSUMER...`."""
    return [
        sys.executable, "-m", "xsk_broker", "request", "--socket", str(broker.socket_path),
        "--ifname", ifname, "--queues", str(queues), "--handout", "map", *extra, "--",
        *consumer,
    ]  # fmt: skip


def in_lab(lab: VethLab, argv: list[str], **options: object) -> subprocess.CompletedProcess[str]:
    return run_captured(argv, preexec_fn=lambda: enter_netns(lab.ns_a), timeout=60, **options)


def leases(broker: BrokerProcess) -> list[LeaseInfo]:
    return broker.client().status().leases


lab2 = veth_lab_fixture(queues=2)
broker2 = broker_fixture("lab2", "--map-pins")


def drop_box(workdir: Path) -> Path:
    """A directory the consumers (other uids) may write their ready files to; not the
    broker's state directory's parent, which the broker checks nobody else can write."""
    box = workdir / "box"
    box.mkdir(exist_ok=True)
    box.chmod(0o777)
    return box


def lease_pin_dir(pin_root: Path) -> Path:
    return pin_root.with_name(pin_root.name + "-leases")


def test_device_plugin_hands_the_map_to_the_consumer_uid_only(
    broker2: BrokerProcess, lab2: VethLab, pin_root: Path
) -> None:
    """The PMD's handshake gets the XSKMAP; the consumer's uid can fill it (as DPDK does);
    another uid connecting to the same socket gets naks and no fd, and the broker logs it;
    when the consumer exits, the socket, the pin and the broker's fds for it are gone."""
    ifname = lab2.ifname_a
    with broker2.client().lease(Request(ifname, 1)) as first:  # attached from here on
        broker2.client().release(first.lease_id)
    fds_before = broker2.quiet_fd_count()
    consumer = request_map(broker2, ifname, 2, [
        "sh", "-c", 'echo "$0" >&2; "$@"', "{dp-path} {map-path}",
        *actor("device_plugin", "{dp-path}", ifname, "/config_busy_poll,10,64", "/bogus"),
    ])  # fmt: skip
    with subprocess.Popen(
        as_uid(UNPRIVILEGED_UID, consumer),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: enter_netns(lab2.ns_a),
    ) as proc:  # fmt: skip
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    dp_path, map_pin = err.splitlines()[0].split()
    seen = json.loads(out)
    replies = {r["sent"].partition(",")[0]: r for r in seen["replies"]}
    assert replies["/connect"]["reply"] == "/host_ok"
    assert replies["/version"]["reply"] == "0.1"
    assert replies["/xsk_map_fd"]["reply"] == "/fd_ack"
    assert replies["/xsk_map_fd"]["types"] == [17]
    # its fd makes the kernel refuse the send (SO_PASSRIGHTS=0, Linux 6.16+); older: /nak
    assert replies["/config_busy_poll"]["reply"] in ("EPERM", "/nak")
    assert replies["/bogus"]["reply"] == "/nak"
    assert replies["/fin"]["reply"] == "/fin_ack"
    assert seen["filled"] == 0  # CAP_NET_RAW made the socket, the map fd let it in
    assert Path(map_pin).parent == lease_pin_dir(pin_root)
    # The lease ended with its consumer: nothing is left for anyone else to open.
    wait_until(lambda: not leases(broker2))
    assert not Path(dp_path).exists() and not Path(map_pin).exists()
    assert broker2.settled_fd_count(fds_before) == fds_before  # the map, listener, conns
    assert broker2.client().status().attachments  # the program stays for the next lease


def test_another_uid_gets_no_map_and_is_logged(
    broker2: BrokerProcess, lab2: VethLab, pin_root: Path, workdir: Path
) -> None:
    """Kernel identity, not the hostname text: uid OTHER_UID on the consumer's socket gets
    /host_nak and /fd_nak with no fd, and cannot open the pin either."""
    ifname = lab2.ifname_a
    ready = drop_box(workdir) / "lease.json"
    holder = subprocess.Popen(
        as_uid(UNPRIVILEGED_UID, request_map(broker2, ifname, 2, [
            "sh", "-c", 'echo "$1 $2" > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 600',
            str(ready), "{dp-path}", "{map-path}",
        ])),
        preexec_fn=lambda: enter_netns(lab2.ns_a),
    )  # fmt: skip
    try:
        wait_until(ready.exists, timeout=60)
        dp_path, map_pin = ready.read_text().split()
        got = in_lab(lab2, as_uid(OTHER_UID, actor("device_plugin", dp_path, ifname)))
        seen = json.loads(got.stdout)
        assert [r["reply"] for r in seen["replies"]] == ["/host_nak", "/nak", "/fd_nak", "/nak"]
        assert all(r["fds"] == 0 for r in seen["replies"])
        assert f"to uid {OTHER_UID}" in broker2.log()
        opened = in_lab(
            lab2,
            as_uid(OTHER_UID, [sys.executable, "-c", f"open({map_pin!r}, 'rb')"]),
        )
        assert "Permission denied" in opened.stderr
        info = Path(map_pin).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (UNPRIVILEGED_UID, 0o600)
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: not leases(broker2))


SHARED_NIC_POLICY = "exclusive_tenancy = false\n" + LAB_POLICY


def test_tenants_cannot_reach_each_others_queues(
    lab2: VethLab, pin_root: Path, workdir: Path
) -> None:
    """Two map leases on one interface (the policy lets tenants share it), queue 0 for uid
    61000 and queue 1 for uid 61001. The second tenant writes its own socket into every
    slot of the map it was given (what a holder of a shared XSKMAP could do to take or
    blank other queues): the first tenant still gets every frame sent to queue 0, the
    second those sent to queue 1."""
    with BrokerProcess(lab2.ns_a, pin_root, workdir, policy=SHARED_NIC_POLICY) as broker:
        _two_tenants(broker, lab2, workdir)


def _two_tenants(broker2: BrokerProcess, lab2: VethLab, workdir: Path) -> None:
    ifname = lab2.ifname_a
    box = drop_box(workdir)
    tenants = {}
    for queue, uid in ((0, UNPRIVILEGED_UID), (1, OTHER_UID)):
        ready = box / f"ready{queue}"
        consumer = actor(
            "map_tenant", "{dp-path}", ifname, str(queue), "0,1", str(ready), str(box / "sent")
        )
        request = request_map(
            broker2, ifname, 1, consumer, "--start-queue", str(queue), "--mode", "native"
        )
        tenants[queue] = subprocess.Popen(
            as_uid(uid, request), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: enter_netns(lab2.ns_a),
        )  # fmt: skip
        wait_until(ready.exists, timeout=60)
    for queue, count in ((0, 50), (1, 40)):
        assert send_to_queue(lab2.b, lab2.a, steer_queue(queue, "native", 2), "t", count) == count
    (box / "sent").touch()  # they count until then: a window from their start could end first
    seen = {}
    for queue, proc in tenants.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        seen[queue] = json.loads(out)
    assert seen[1]["filled"] == [0, 0]  # it could write both slots of its own map
    assert seen[0]["received"] == 50
    assert seen[1]["received"] == 40
    wait_until(lambda: not leases(broker2))


def map_id(pin: Path) -> int:
    fd = bpf.get_pinned(str(pin))
    try:
        return bpf.map_info(fd).map_id
    finally:
        os.close(fd)


def slots_of(pin: Path, count: int) -> list[int | None]:
    """The id of the map in each slot of a pinned map of maps; None where it is empty."""
    fd, libbpf, found = bpf.get_pinned(str(pin)), ctypes.CDLL("libbpf.so.1"), []
    try:
        for slot in range(count):
            key, value = ctypes.c_uint32(slot), ctypes.c_uint32()
            empty = libbpf.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
            found.append(None if empty else value.value)
        return found
    finally:
        os.close(fd)


# xdpprog.instructions(0) as brokers up to fe4af8b loaded them (the map of maps' fd goes
# into the immediate of instruction 2): a queue whose slot is empty passes its frames to the
# stack, so those brokers filled every slot with the shared map at attach.
OLDER_PROGRAM = bytes.fromhex(
    "6112100000000000632afcff0000000018110000000000000000000000000000bfa2000000000000"
    "07020000fcffffff85000000010000001500050000000000bf0100000000000061a2fcff00000000"
    "b70300000200000085000000330000009500000000000000b7000000020000009500000000000000"
)


def pin_older_attachment(lab: VethLab, pins: Path) -> None:
    """Attach and pin what an older broker left on lab's `a` end: OLDER_PROGRAM, natively,
    with both slots of its map of maps holding its shared XSKMAP."""
    shared = bpf.create_xskmap("xsks_older", 2)
    queues = bpf.create_map_of_maps("queues_older", shared, 2)
    prog = link = -1
    try:
        bpf.map_fill(queues, [0, 1], shared)
        code = bytearray(OLDER_PROGRAM)
        struct.pack_into("<i", code, 2 * 8 + 4, queues)
        prog = bpf.load_xdp_program("xsk_redirect", bytes(code))
        with in_netns(lab.ns_a):
            link = bpf.create_xdp_link(prog, lab.a.ifindex, bpf.XDP_FLAGS_DRV_MODE)
        pins.mkdir(mode=0o700, parents=True)
        bpf.pin(shared, str(pins / "map"))
        bpf.pin(queues, str(pins / "queues"))
        bpf.pin(link, str(pins / "link_native"))
    finally:
        for fd in (shared, queues, prog, link):
            if fd >= 0:
                os.close(fd)


@pytest.mark.parametrize("older", [False, True], ids=["attached", "adopted-older"])
def test_only_map_leases_fill_slots_of_the_map_of_maps(
    broker2: BrokerProcess, lab2: VethLab, pin_root: Path, workdir: Path, older: bool
) -> None:
    """Attaching writes no slot of the map of maps (each write waits out an RCU grace
    period): a socket lease receives through the shared XSKMAP the program falls back to,
    a map lease through its own map in its queue's slot, and once the map lease ends its
    queue is the shared map's again and a socket lease on it receives. An attachment an
    older broker pinned, whose program has no fallback and whose slots all hold the shared
    map, is adopted as it is and serves the same."""
    ifname, pins = lab2.ifname_a, pin_dir(lab2, pin_root) / str(lab2.a.ifindex)
    if older:
        pin_older_attachment(lab2, pins)
    steer = {q: steer_queue(q, "native", 2) for q in (0, 1)}
    with running_probe(broker2, ifname, 1, "--mode", "native", "--expect", "16") as sockets:
        shared = map_id(pins / "map")
        unleased = shared if older else None
        assert slots_of(pins / "queues", 2) == [unleased, unleased]
        assert send_to_queue(lab2.b, lab2.a, steer[0], "s", 8) == 8
        ready, sent = drop_box(workdir) / "ready", drop_box(workdir) / "sent"
        consumer = actor("map_tenant", "{dp-path}", ifname, "1", "1", str(ready), str(sent))
        request = request_map(broker2, ifname, 1, consumer, "--start-queue", "1")
        with subprocess.Popen(
            as_uid(UNPRIVILEGED_UID, request), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=lambda: enter_netns(lab2.ns_a),
        ) as tenant:  # fmt: skip
            wait_until(ready.exists, timeout=60)
            first, own = slots_of(pins / "queues", 2)
            assert first == unleased and own not in (None, shared)
            assert send_to_queue(lab2.b, lab2.a, steer[1], "m", 40) == 40
            assert send_to_queue(lab2.b, lab2.a, steer[0], "s", 8) == 8
            sent.touch()  # it counts until then
            out, err = tenant.communicate(timeout=30)
        assert tenant.returncode == 0, err
        assert json.loads(out)["received"] == 40
        assert sockets.result().queues[0].received == 16
    wait_until(lambda: not leases(broker2))
    assert slots_of(pins / "queues", 2) == [unleased, shared]
    with running_probe(
        broker2, ifname, 1, "--start-queue", "1", "--expect", "8"
    ) as after:  # fmt: skip
        assert send_to_queue(lab2.b, lab2.a, steer[1], "a", 8) == 8
        assert after.result().queues[0].received == 8
    assert broker2.client().status().attachments[0].adopted == older


def test_a_map_lease_survives_a_broker_restart_and_ends_clean(
    broker2: BrokerProcess, lab2: VethLab, workdir: Path
) -> None:
    """The lease's steering lives in the pinned map of maps: a broker killed outright and
    started again adopts it, and when the consumer then exits its pin is removed and its
    queue can be leased again, to a map lease or to sockets."""
    ifname = lab2.ifname_a
    ready = drop_box(workdir) / "paths"
    script = 'echo "$1" > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 600'
    consumer = ["sh", "-c", script, str(ready), "{map-path}"]
    holder = subprocess.Popen(
        as_uid(UNPRIVILEGED_UID, request_map(broker2, ifname, 1, consumer)),
        preexec_fn=lambda: enter_netns(lab2.ns_a),
    )  # fmt: skip
    try:
        wait_until(ready.exists, timeout=60)
        map_pin = Path(ready.read_text().strip())
        broker2.kill()
        broker2.start()
        (lease,) = leases(broker2)
        assert lease.handout == "map" and map_pin.exists()
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: not leases(broker2))
    assert not map_pin.exists()
    again = in_lab(lab2, as_uid(UNPRIVILEGED_UID, request_map(broker2, ifname, 1, ["true"])))
    assert again.returncode == 0, again.stderr
    with broker2.client().lease(Request(ifname, 1)) as sockets:
        assert sockets.queue_ids == [0]


def drop_journal_record(state_dir: Path, lease_id: str) -> None:
    """Leave the lease journal as a broker that died between steering a map lease's queues
    and journaling the lease would have: without that lease's record."""
    journal = state_dir / "leases.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("add", {}).get("lease_id") != lease_id]
    assert len(kept) < len(lines)
    journal.write_bytes(b"".join(kept))


# Below the probe's 8 MiB memlock limit, which counts what its uid holds through map leases.
SMALL_UMEM = ("--umem-bytes", str(1 << 20))


def map_lease_on(
    broker: BrokerProcess, lab: VethLab, queue: int, consumer: list[str], **options: Any
) -> subprocess.Popen[str]:
    """A map lease on one queue (native mode, a small UMEM) for consumer, run as
    UNPRIVILEGED_UID."""
    request = request_map(
        broker, lab.ifname_a, 1, consumer, "--start-queue", str(queue), "--mode", "native",
        *SMALL_UMEM,
    )  # fmt: skip
    return subprocess.Popen(
        as_uid(UNPRIVILEGED_UID, request),
        text=True,
        preexec_fn=lambda: enter_netns(lab.ns_a),
        **options,
    )


def test_a_restart_gives_back_the_slots_no_live_lease_owns(
    lab4: VethLab, pin_root: Path, workdir: Path
) -> None:
    """Three map leases, queues 0, 1 and 2, then the broker is killed outright. Queue 1's
    lease is left as a broker that died between steering it and journaling it leaves it
    (its record dropped: slot steered, pin and socket made, no lease), queue 2's consumer
    exits while no broker runs. The next broker steers queues 1 and 2 back to the shared
    XSKMAP (one audit line naming both) and removes their pins and sockets: a socket lease
    on them receives. Queue 0's lease keeps its slot, and its consumer the frames sent to
    it after the restart."""
    ifname, pins = lab4.ifname_a, pin_dir(lab4, pin_root) / str(lab4.a.ifindex)
    box, holders, paths = drop_box(workdir), [], {}
    with BrokerProcess(lab4.ns_a, pin_root, workdir, "--map-pins") as broker:
        ready, sent = box / "tenant", box / "sent"
        consumer = actor("map_tenant", "{dp-path}", ifname, "0", "0", str(ready), str(sent))
        tenant = map_lease_on(
            broker, lab4, 0, consumer, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            wait_until(ready.exists, timeout=60)
            for queue in (1, 2):
                ready = box / f"paths{queue}"
                script = 'echo "$1 $2" > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 600'
                consumer = ["sh", "-c", script, str(ready), "{dp-path}", "{map-path}"]
                holders.append(map_lease_on(broker, lab4, queue, consumer))
                wait_until(ready.exists, timeout=60)
                paths[queue] = [Path(p) for p in ready.read_text().split()]
            by_queue = {lease.queue_ids[0]: lease.lease_id for lease in leases(broker)}
            shared, steered = map_id(pins / "map"), slots_of(pins / "queues", 4)
            assert None not in steered[:3] and shared not in steered
            broker.kill()
            for holder in holders:
                holder.kill()
                holder.wait()
            drop_journal_record(broker.state_dir, by_queue[1])
            broker.start()
            with running_probe(
                broker, ifname, 2, "--start-queue", "1", "--mode", "native", "--expect", "8",
                duration=60,
            ) as probe:  # fmt: skip
                for queue in (1, 2):
                    assert send_to_queue(lab4.b, lab4.a, queue, f"q={queue}", 8) == 8
                assert [q.received for q in probe.result().queues] == [8, 8]
            assert send_to_queue(lab4.b, lab4.a, 0, "q=0", 30) == 30
            sent.touch()  # the tenant counts until then
            assert slots_of(pins / "queues", 4) == [steered[0], shared, shared, None]
            assert [lease.lease_id for lease in leases(broker)] == [by_queue[0]]
            out, err = tenant.communicate(timeout=60)
        finally:
            for proc in (tenant, *holders):
                proc.kill()
                proc.wait()
        assert tenant.returncode == 0, err
        assert json.loads(out)["received"] == 30
        assert [path for path in paths[1] + paths[2] if path.exists()] == []
        (line,) = [line for line in broker.log().splitlines() if "event=reconciled" in line]
        assert f"interface={ifname} queues=1,2" in line


def test_a_pin_directory_someone_else_made_is_refused(
    lab2: VethLab, pin_root: Path, workdir: Path
) -> None:
    """bpffs's root is world-writable: a uid that makes the lease pin directory first could
    swap pins in it. The broker refuses to pin there, says why, and leaves nothing behind;
    nor does it remove anything there at start (a pin named like a lease that is not live)."""
    planted = lease_pin_dir(pin_root)
    planted.mkdir()
    planted.chmod(0o777)  # not left to mkdir's mode, which the umask narrows
    os.chown(planted, OTHER_UID, UNPRIVILEGED_GID)
    decoy = planted / "0123456789ab"
    fd = bpf.create_xskmap("decoy", 1)
    try:
        bpf.pin(fd, str(decoy))
    finally:
        os.close(fd)
    try:
        with BrokerProcess(lab2.ns_a, pin_root, workdir, "--map-pins") as broker:
            got = in_lab(lab2, request_map(broker, lab2.ifname_a, 1, ["true"]))
            assert got.returncode != 0
            assert got.stderr.startswith("UNTRUSTED_PATH"), got.stderr
            assert str(planted) in got.stderr
            assert not leases(broker)
            assert not list((broker.state_dir / "dp").glob("*"))
            assert list(planted.iterdir()) == [decoy]
    finally:
        decoy.unlink(missing_ok=True)
        planted.rmdir()


@pytest.fixture(scope="module")
def dpdk() -> Dpdk:
    return ensure_dpdk()


def peer_rx_packets(lab: VethLab) -> int:
    (link,) = json.loads(run(["ip", "-n", lab.ns_b, "-j", "-s", "link", "show", lab.ifname_b]))
    return int(link["stats64"]["rx"]["packets"])


def vdevs(ifname: str, queues: int, option: str) -> list[str]:
    """One af_xdp port per queue (see lab.dpdk.pmd_args)."""
    return [
        f"net_af_xdp{q},iface={ifname},start_queue={q},queue_count=1,{option}"
        for q in range(queues)
    ]


@pytest.mark.parametrize("forward", ["rxonly", "txonly"])
@pytest.mark.parametrize("how", ["use_cni", "use_pinned_map"])
@pytest.mark.parametrize("mode", ["native", "skb"])
def test_unmodified_testpmd_unprivileged(
    dpdk: Dpdk, lab2: VethLab, pin_root: Path, workdir: Path, mode: str, how: str, forward: str
) -> None:
    """dpdk-testpmd as uid 61000 with CAP_NET_RAW and CAP_IPC_LOCK only, through
    `xsk-broker request --handout map`, one port per leased queue: frames the peer sends to
    each queue arrive on its port (rxonly; in skb mode veth steers to queue 0 only, see
    lab.netlab.steer_queue), and every port sends frames the peer receives (txonly). Port 1
    passes busy_budget=0 as docs/client.md advises, port 0 keeps the PMD's default."""
    path = "{dp-path}" if how == "use_cni" else "{map-path}"
    shared_runtime_before = SHARED_RUNTIME.exists()
    ports = vdevs(lab2.ifname_a, 2, f"{how}=1,dp_path={path}")
    ports[1] += ",busy_budget=0"
    with BrokerProcess(lab2.ns_a, pin_root, workdir, "--map-pins") as broker:
        command = dpdk.testpmd() + pmd_args(ports, forward)
        request = request_map(broker, lab2.ifname_a, 2, command, "--mode", mode)
        before = peer_rx_packets(lab2)
        pmd = PmdRun(as_uid(UNPRIVILEGED_UID, request), preexec_fn=lambda: enter_netns(lab2.ns_a))
        sent = {}
        try:
            assert pmd.started(), pmd.output
            if forward == "rxonly":
                for q in range(2) if mode == "native" else range(1):
                    sent[q] = send_to_queue(lab2.b, lab2.a, steer_queue(q, mode, 2), "dp", 100 + q)
            # Stopped once its statistics show every frame taken off its ring (rxonly) or
            # frames sent on every port (txonly); fail=False: the assertions below say more.
            least = sent if forward == "rxonly" else {0: 1, 1: 1}
            column = 0 if forward == "rxonly" else 1
            wait_until(
                lambda: all(pmd.nic_stats().get(q, (0, 0))[column] >= n for q, n in least.items()),
                fail=False,
            )
        finally:
            output = pmd.stop()
        stats = port_stats(output)
        assert set(stats) == {0, 1}, output
        if forward == "rxonly":
            assert {q: stats[q][0] for q in sent} == sent == {q: 100 + q for q in sent}, output
        else:
            assert all(tx > 0 for _rx, tx in stats.values()), output
            assert peer_rx_packets(lab2) - before >= 0.9 * sum(tx for _rx, tx in stats.values())
        assert (broker.log().count("its XSKMAP to pid") == 2) == (how == "use_cni")
        wait_until(lambda: not leases(broker))
    assert not SHARED_RUNTIME.exists() or shared_runtime_before, "EAL's runtime dir was left"
    assert not pmd.runtime.exists()


def test_testpmd_refused_where_the_policy_says_no(
    dpdk: Dpdk, lab2: VethLab, pin_root: Path, workdir: Path
) -> None:
    """The same testpmd command, with a policy that does not name uid 61000: the request is
    refused before testpmd runs, and the refusal is in the broker's log."""
    policy = '[[allow]]\nname = "root only"\nusers = [0]\n'
    ports = vdevs(lab2.ifname_a, 2, "use_cni=1,dp_path={dp-path}")
    with BrokerProcess(lab2.ns_a, pin_root, workdir, policy=policy) as broker:
        command = dpdk.testpmd() + pmd_args(ports, "rxonly")
        got = in_lab(lab2, as_uid(UNPRIVILEGED_UID, request_map(broker, lab2.ifname_a, 2, command)))
        assert got.returncode != 0
        assert got.stderr.startswith("DENIED"), got.stderr
        assert "EAL" not in got.stdout + got.stderr
        assert f"to uid {UNPRIVILEGED_UID}" in broker.log() and "event=denied" in broker.log()
    assert not xdp_of(lab2)
