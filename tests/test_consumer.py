"""The pure-Python AF_XDP consumer and the lab, on a real kernel in throwaway namespaces.

Everything runs inside `xskt-` namespaces that VethLab deletes on exit, so no host interface
is touched. The unprivileged tests use uid/gid 61317 (no passwd entry), apart from the
61000 default, so that locked memory other suites charge to 61000 does not interfere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict, Unpack

import pytest
from support import REPO, actor

from broker.fdpass import close_all
from broker.loader import Loader
from broker.xsk import create_sockets
from client.consumer import ETH_P_EXPERIMENTAL, XskSocket, mac_bytes, make_frame
from lab import netlab
from lab.netlab import Endpoint, QueueSender, VethLab, in_netns, steer_queue, xdp_socket

pytestmark = pytest.mark.kernel

QUEUES = 3
UID = GID = 61317
BURST = 40


@pytest.fixture
def lab() -> Iterator[VethLab]:
    """A fresh pair per test (about 20 ms): a closed socket keeps its queue for ~17 ms."""
    with VethLab(QUEUES) as veth:
        yield veth


def capture(endpoint: Endpoint) -> socket.socket:
    """An AF_PACKET socket inside the endpoint's namespace seeing only our ethertype."""
    with in_netns(endpoint.netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_EXPERIMENTAL))
    sock.bind((endpoint.ifname, ETH_P_EXPERIMENTAL))
    return sock


def collect(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """Up to count frames, waiting at most timeout in total."""
    deadline = time.monotonic() + timeout
    frames: list[bytes] = []
    while len(frames) < count and (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            frames.append(sock.recv(4096))
        except TimeoutError:
            break
    return frames


def burst(src: Endpoint, dst: Endpoint, tag: str) -> list[bytes]:
    return [make_frame(dst.mac, src.mac, f"{tag} #{i}".encode()) for i in range(BURST)]


class Geometry(TypedDict, total=False):
    """XskSocket's keyword arguments."""

    frames: int
    frame_size: int
    ring_size: int
    copy: bool


def consumer_on(endpoint: Endpoint, queue: int, **kwargs: Unpack[Geometry]) -> XskSocket:
    """What a lease gives QEMU: a socket made as root in the namespace, then set up."""
    with in_netns(endpoint.netns), xdp_socket() as sock:
        return XskSocket(sock.fileno(), endpoint.ifindex, queue, **kwargs)


@pytest.mark.parametrize("queue", range(QUEUES))
def test_tx_reaches_the_peer(lab: VethLab, queue: int) -> None:
    frames = burst(lab.a, lab.b, f"a->b q{queue}")
    with capture(lab.b) as cap, consumer_on(lab.a, queue) as xsk:
        assert xsk.send(frames) == len(frames)
        assert collect(cap, len(frames)) == frames
        assert xsk.stats()["tx_invalid_descs"] == 0


def test_queue_sender_reaches_the_other_end(lab: VethLab) -> None:
    frames = burst(lab.b, lab.a, "b->a")
    with capture(lab.a) as cap, QueueSender(lab.b, QUEUES - 1) as sender:
        assert sender.send(frames) == len(frames)
        assert collect(cap, len(frames)) == frames


def test_more_frames_than_the_rings_hold(lab: VethLab) -> None:
    """Frames are recycled through the completion ring, 8 tx frames for 100 sends."""
    frames = [make_frame(lab.b.mac, lab.a.mac, b"x%d" % i) for i in range(100)]
    with capture(lab.b) as cap, consumer_on(lab.a, 0, frames=16, ring_size=8) as xsk:
        assert xsk.send(frames) == len(frames)
        assert collect(cap, len(frames)) == frames


def test_send_refuses_frames_that_do_not_fit(lab: VethLab) -> None:
    with consumer_on(lab.a, 0, frame_size=2048) as xsk, pytest.raises(ValueError, match="2048"):
        xsk.send([bytes(2049)])


def test_frames_over_the_mtu_complete_but_never_arrive(lab: VethLab) -> None:
    """Documents a kernel behaviour: completion is not delivery, and no counter moves."""
    oversize = make_frame(lab.b.mac, lab.a.mac, bytes(2000))
    with capture(lab.b) as cap, consumer_on(lab.a, 0) as xsk:
        assert xsk.send([oversize]) == 1
        assert collect(cap, 1, timeout=0.2) == []
        assert xsk.stats()["tx_invalid_descs"] == 0


def test_bind_to_another_device_than_so_bindtodevice_is_einval(lab: VethLab) -> None:
    with in_netns(lab.ns_a), xdp_socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        with pytest.raises(OSError, match="SO_BINDTODEVICE") as caught:
            XskSocket(sock.fileno(), lab.a.ifindex, 0)
    assert caught.value.errno == errno.EINVAL


def test_bind_to_the_device_of_so_bindtodevice_works(lab: VethLab) -> None:
    with in_netns(lab.ns_a), xdp_socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, lab.ifname_a.encode())
        XskSocket(sock.fileno(), lab.a.ifindex, 0).close()


@pytest.mark.parametrize(
    ("queue", "expected"), [(QUEUES, errno.EINVAL), (1, errno.EBUSY)], ids=["missing", "taken"]
)
def test_bind_errors_carry_the_kernel_errno(lab: VethLab, queue: int, expected: int) -> None:
    with consumer_on(lab.a, 1), pytest.raises(OSError, match=f"queue {queue}") as caught:
        consumer_on(lab.a, queue)
    assert caught.value.errno == expected


def test_a_socket_is_single_use(lab: VethLab) -> None:
    with in_netns(lab.ns_a), xdp_socket() as sock:
        XskSocket(sock.fileno(), lab.a.ifindex, 0).close()
        with pytest.raises(OSError, match=r"XDP_UMEM_REG.*single-use") as caught:
            XskSocket(sock.fileno(), lab.a.ifindex, 0)
    assert caught.value.errno == errno.EBUSY


def test_bad_geometry_is_refused_before_the_kernel(lab: VethLab) -> None:
    bad: tuple[Geometry, ...] = ({"frame_size": 3000}, {"ring_size": 100}, {"frames": 1})
    for kwargs in bad:
        with pytest.raises(ValueError):
            XskSocket(-1, lab.a.ifindex, 0, **kwargs)


@pytest.mark.parametrize("mode", ["native", "skb"])
def test_rx_through_the_brokers_xskmap(mode: str) -> None:
    """Frames steered by steer_queue() land on exactly the consumer of the target queue."""
    with contextlib.ExitStack() as stack:
        veth = stack.enter_context(VethLab(QUEUES))
        pins = stack.enter_context(netlab.bpffs())
        with in_netns(veth.ns_a):
            loader = Loader(pins / "xsk-broker")
            attachment = loader.ensure(veth.ifname_a, mode, range(QUEUES))
        stack.callback(loader.detach, attachment.ifindex)
        assert attachment.mode == mode
        with in_netns(veth.ns_a):
            fds = create_sockets(attachment, list(range(QUEUES)))
        try:
            consumers = [
                stack.enter_context(XskSocket(fd, veth.a.ifindex, q)) for q, fd in enumerate(fds)
            ]
        finally:
            close_all(fds)
        for target in range(QUEUES - (mode == "skb")):
            frames = burst(veth.b, veth.a, f"{mode} rx{target}")
            with QueueSender(veth.b, steer_queue(target, mode, QUEUES)) as sender:
                assert sender.send(frames) == len(frames)
            got: list[bytes] = []
            while len(got) < len(frames) and (more := consumers[target].receive(2.0)):
                got += more
            assert got == frames
            assert not any(c.receive(0) for c in consumers)
        assert all(c.stats()["rx_dropped"] == 0 for c in consumers)


def child(
    name: str, *args: str, netns: str | None = None, pass_fds: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Run the actor `name` as UID/GID with no capabilities; its last stdout line is JSON."""
    result = netlab.run_unprivileged(
        actor(name, *args),
        UID,
        GID,
        netns=netns,
        extra_groups=(GID + 1,),
        env={"PYTHONPATH": str(REPO)},
        pass_fds=pass_fds,
    )
    assert result.returncode == 0, result.stderr
    last: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return last


def test_unprivileged_child_has_no_privileges(lab: VethLab) -> None:
    seen = child("identity", netns=lab.ns_b)
    assert seen["Uid"] == [str(UID)] * 4
    assert seen["Gid"] == [str(GID)] * 4
    assert seen["Groups"] == [str(GID + 1)]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(seen[caps][0], 16) == 0, caps
    assert seen["NoNewPrivs"] == ["1"]
    assert seen["net"] == os.stat(netlab.netns_path(lab.ns_b)).st_ino


def lease_like_socket(endpoint: Endpoint) -> socket.socket:
    """What the broker hands out: unbound, tied to the device, inheritable."""
    with in_netns(endpoint.netns):
        sock = xdp_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, endpoint.ifname.encode())
    return sock


def test_unprivileged_consumer_transmits_on_a_lent_socket(lab: VethLab) -> None:
    with capture(lab.b) as cap, lease_like_socket(lab.a) as sock:
        argv = (str(sock.fileno()), str(lab.a.ifindex), "256", lab.b.mac, lab.a.mac)
        assert child("lent_socket_tx", *argv, netns=lab.ns_a, pass_fds=(sock.fileno(),)) == {
            "sent": 8
        }
        assert len(collect(cap, 8)) == 8


def test_umem_over_rlimit_memlock_is_enobufs_with_advice(lab: VethLab) -> None:
    with lease_like_socket(lab.a) as sock:
        frames = 4096  # 16 MiB, over the 8 MiB hard limit
        argv = (str(sock.fileno()), str(lab.a.ifindex), str(frames), lab.b.mac, lab.a.mac)
        seen = child("lent_socket_tx", *argv, netns=lab.ns_a, pass_fds=(sock.fileno(),))
    assert seen["errno"] == errno.ENOBUFS
    assert "RLIMIT_MEMLOCK" in seen["message"] and "16 MiB UMEM" in seen["message"]


def test_lab_deletes_its_namespaces_on_exit_and_on_error() -> None:
    with VethLab() as clean:
        assert all(netlab.netns_path(ns).exists() for ns in clean.namespaces)
    with pytest.raises(RuntimeError, match="inside"), VethLab() as failed:
        raise RuntimeError("inside")
    broken = VethLab(queues=4097)  # more than the kernel's 4096: `ip link add` fails
    with pytest.raises(netlab.LabError, match="link add"), broken:
        pass
    for lab in (clean, failed, broken):
        assert not any(netlab.netns_path(ns).exists() for ns in lab.namespaces)
        assert not any(lab.name in line for line in netlab.run(["ip", "netns", "list"]).split())


def test_names_fit_in_ifnamsiz(lab: VethLab) -> None:
    for name in (lab.ifname_a, lab.ifname_b):
        assert name.startswith("xskt-") and len(name.encode()) <= 15


def test_in_netns_is_per_thread_and_restores_on_error(lab: VethLab) -> None:
    def current() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    home = current()
    with pytest.raises(KeyError), in_netns(lab.ns_a):
        assert current() == os.stat(netlab.netns_path(lab.ns_a)).st_ino
        assert socket.if_nametoindex(lab.ifname_a) == lab.a.ifindex
        raise KeyError
    assert current() == home
    with pytest.raises(OSError, match="does not exist") as caught, in_netns("xskt-absent"):
        pass
    assert caught.value.errno == errno.ENOENT and current() == home


def test_bpffs_is_mounted_and_removed() -> None:
    with netlab.bpffs() as path:
        mounts = Path("/proc/self/mounts").read_text()
        assert f"xskt-bpf {path} bpf " in mounts
    assert str(path) not in Path("/proc/self/mounts").read_text()
    assert not path.exists()


@pytest.mark.parametrize(
    ("target", "mode", "queues", "tx"),
    [
        (0, "native", 1, 0),
        (2, "native", 4, 2),
        (0, "skb", 1, 0),
        (0, "skb", 4, 1),
        (2, "skb", 4, 3),
    ],
)
def test_steer_queue(target: int, mode: str, queues: int, tx: int) -> None:
    assert steer_queue(target, mode, queues) == tx


@pytest.mark.parametrize(("target", "mode"), [(3, "skb"), (4, "native"), (0, "auto")])
def test_steer_queue_refuses_the_impossible(target: int, mode: str) -> None:
    with pytest.raises(ValueError):
        steer_queue(target, mode, 4)


def test_make_frame() -> None:
    frame = make_frame("02:00:00:00:00:01", bytes(6), b"hi")
    assert frame == bytes.fromhex("02000000000100000000000088b5") + b"hi"
    with pytest.raises(ValueError):
        mac_bytes("02:00")
