"""LinkWatch against real veths in throwaway namespaces: no polling, nothing missed."""

from __future__ import annotations

import json
import os
import select
import socket
import tempfile
from collections.abc import Iterator

import pytest
from support import REPO, actor, open_fds

from broker.linkwatch import LinkEvent, LinkWatch
from broker.netdev import dump_links
from lab.netlab import VethLab, in_netns, run, run_unprivileged

pytestmark = pytest.mark.kernel


@pytest.fixture
def lab() -> Iterator[VethLab]:
    with VethLab() as lab:
        yield lab


def collect(watch: LinkWatch, want: int, timeout: float = 10.0) -> list[LinkEvent]:
    """Drain whenever the watcher's fd turns readable, until `want` events arrived."""
    events: list[LinkEvent] = []
    while len(events) < want:
        readable, _, _ = select.select([watch], [], [], timeout)
        assert readable, f"only {events} within {timeout} s"
        events += watch.drain()
    return events


def add_veth(ns: str, name: str, peer: str) -> None:
    run(["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer])


def test_knows_existing_links_and_drain_without_events_returns_nothing(lab: VethLab) -> None:
    with in_netns(lab.ns_a), LinkWatch() as watch:
        assert watch.links == {1: "lo", lab.a.ifindex: lab.ifname_a}
        assert watch.drain() == []
        run(["ip", "-n", lab.ns_a, "link", "set", lab.ifname_a, "mtu", "1400"])
        run(["ip", "-n", lab.ns_a, "link", "set", lab.ifname_a, "down"])
        assert select.select([watch], [], [], 10.0)[0], "state changes do reach the socket"
        assert watch.drain() == [], "state changes of a known link are not events"
        assert watch.drain() == []


def test_added_renamed_and_removed_veth_with_nothing_leaked(lab: VethLab) -> None:
    before = open_fds()
    c, d, e = (lab.name + suffix for suffix in "cde")
    with in_netns(lab.ns_a):
        watch = LinkWatch()
    add_veth(lab.ns_a, c, d)
    added = collect(watch, 2)
    assert {(x.kind, x.ifname) for x in added} == {("added", c), ("added", d)}
    index = {x.ifname: x.ifindex for x in added}
    run(["ip", "-n", lab.ns_a, "link", "set", c, "up"])
    run(["ip", "-n", lab.ns_a, "link", "set", d, "name", e])
    assert collect(watch, 1) == [LinkEvent("renamed", index[d], e)]
    run(["ip", "-n", lab.ns_a, "link", "delete", c])
    removed = collect(watch, 2)
    assert sorted(removed, key=lambda x: x.ifname) == [
        LinkEvent("removed", index[c], c),
        LinkEvent("removed", index[d], e),
    ]
    assert watch.drain() == []
    watch.close()
    assert open_fds() == before


def test_peer_deleted_from_another_namespace_is_removed_there(lab: VethLab) -> None:
    """What the broker sees when an operator deletes the veth it serves from the far end."""
    with in_netns(lab.ns_b), LinkWatch() as watch:
        run(["ip", "-n", lab.ns_a, "link", "delete", lab.ifname_a])
        assert collect(watch, 1) == [LinkEvent("removed", lab.b.ifindex, lab.ifname_b)]


def test_overflow_is_resynchronised_from_a_dump(lab: VethLab) -> None:
    """With a tiny buffer most events are dropped (ENOBUFS); replaying what drain() reports
    still gives exactly the links that exist."""
    pairs = [(f"{lab.name}{i:02d}x", f"{lab.name}{i:02d}y") for i in range(20)]
    with in_netns(lab.ns_a), LinkWatch() as watch:
        replayed = dict(watch.links)
        with socket.socket(fileno=os.dup(watch.fileno())) as same:
            same.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        with tempfile.NamedTemporaryFile("w", prefix="xskt-", suffix=".batch") as batch:
            batch.writelines(f"link add {x} type veth peer name {y}\n" for x, y in pairs[:15])
            batch.writelines(f"link delete {x}\n" for x, _ in pairs[:5])
            batch.flush()
            run(["ip", "-n", lab.ns_a, "-batch", batch.name])
        while select.select([watch], [], [], 0.2)[0]:
            for event in watch.drain():
                if event.kind == "removed":
                    assert replayed.pop(event.ifindex) == event.ifname
                else:
                    assert (event.kind == "added") == (event.ifindex not in replayed)
                    replayed[event.ifindex] = event.ifname
        assert watch.overflows > 0
        assert replayed == watch.links == dump_links()
        assert set(replayed.values()) == {"lo", lab.ifname_a} | {
            name for pair in pairs[5:15] for name in pair
        }


def test_works_without_any_capability(lab: VethLab) -> None:
    """Subscribing and dumping need no privilege, so it works after the broker drops its caps."""
    result = run_unprivileged(
        actor("linkwatch_links"), netns=lab.ns_a, env={"PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == sorted(["lo", lab.ifname_a])
