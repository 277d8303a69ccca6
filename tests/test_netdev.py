"""The hand-written rtnetlink queries and the loader's liveness cache, on real veths."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import bpf, netdev
from broker.bpffs import remove_pins
from broker.errors import NoSuchDevice
from broker.loader import LIVENESS_RECHECK, Loader
from lab.netlab import VethLab, in_netns, run

pytestmark = pytest.mark.kernel


@pytest.fixture
def lab() -> Iterator[VethLab]:
    with VethLab(queues=3) as lab:
        yield lab


def ip_link(ns: str, ifname: str) -> dict[str, object]:
    (link,) = json.loads(run(["ip", "-n", ns, "-d", "-j", "link", "show", ifname]))
    assert isinstance(link, dict)
    return link


def test_link_state_agrees_with_ip_before_and_after_an_attach(lab: VethLab, pin_root: Path) -> None:
    with in_netns(lab.ns_a):
        ifindex = netdev.ifindex_of(lab.ifname_a)
        before = netdev.link_state(ifindex)
        loader = Loader(pin_root)
        attachment = loader.ensure(lab.ifname_a, "native", range(3))
        after = netdev.link_state(ifindex)
        loader.detach(ifindex)
    link = ip_link(lab.ns_a, lab.ifname_a)
    assert before == netdev.LinkState(ifindex, lab.ifname_a, 3, None, 0)
    assert link["num_rx_queues"] == 3
    assert after.xdp_mode == "native"
    assert after.xdp_prog_id == attachment.prog_id != 0


def test_link_state_of_a_missing_ifindex_is_no_such_device(lab: VethLab) -> None:
    with in_netns(lab.ns_a), pytest.raises(NoSuchDevice, match="ifindex 999999 is gone"):
        netdev.link_state(999999)


def test_dump_links_names_every_link_of_the_namespace(lab: VethLab) -> None:
    with in_netns(lab.ns_a):
        links = netdev.dump_links()
    assert sorted(links.values()) == ["lo", lab.ifname_a]


def test_link_detached_by_someone_else_is_replaced_once_the_recheck_is_due(
    lab: VethLab, pin_root: Path
) -> None:
    """No per-request bpf syscall: a cached attachment is trusted for LIVENESS_RECHECK s."""
    now = [0.0]
    with in_netns(lab.ns_a):
        loader = Loader(pin_root, clock=lambda: now[0])
        first = loader.ensure(lab.ifname_a)
        bpf.detach_link(first.link_fd)  # what `bpftool link detach` does
        assert loader.ensure(lab.ifname_a) is first  # not asked yet
        now[0] += LIVENESS_RECHECK
        second = loader.ensure(lab.ifname_a)
        assert second.is_live() and second.link_id != first.link_id
        assert netdev.link_state(second.ifindex).xdp_prog_id == second.prog_id
        loader.detach(second.ifindex)
        loader.close()


def test_remove_pins_takes_the_directory_and_its_files_and_tolerates_absence(
    tmp_path: Path,
) -> None:
    pin_dir = tmp_path / "7"
    pin_dir.mkdir()
    for name in ("map", "link_native"):
        (pin_dir / name).write_bytes(b"")
    remove_pins(pin_dir)
    remove_pins(pin_dir)
    assert not pin_dir.exists()
    assert os.listdir(tmp_path) == []
