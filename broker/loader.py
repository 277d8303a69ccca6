"""The XSK redirect program on an interface: attach, pin, adopt, detach.

Attachments are bpf_links pinned in bpffs under PIN_ROOT/<netns inode>/<ifindex>/ (with
the shared XSKMAP "map" and the per-queue map of maps "queues"), so they outlive the broker
(a restart or crash never interrupts a VM) and netlink cannot replace them. The attach mode
is part of the link's pin name, so adoption needs no netlink query.
The program itself is in broker.xdpprog, the bpffs handling in broker.bpffs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker import bpf, netdev, xdpprog
from broker.bpffs import ensure_bpffs, remove_pins
from broker.config import DEFAULT_PIN_ROOT
from broker.errors import AttachFailed, BadQueues, Denied, ModeUnsupported, XdpConflict
from broker.protocol import AttachmentInfo

MODE_FLAGS = {"native": bpf.XDP_FLAGS_DRV_MODE, "skb": bpf.XDP_FLAGS_SKB_MODE}
# Errnos that mean "this mode is not possible here", after which auto tries the next mode.
_MODE_REFUSALS = {errno.EOPNOTSUPP, errno.EINVAL, errno.ERANGE}
# Seconds a cached attachment is trusted before the kernel is asked again (Loader.ensure).
LIVENESS_RECHECK = 1.0


@dataclass
class Attachment:
    """The program on one interface; the broker holds the shared XSKMAP's fd (map_fd) to
    insert sockets, and the map of maps (queues_fd: which XSKMAP each queue redirects
    through; an empty slot means the shared one) to give a map lease's queues a private
    map. queues_fd is -1 for an attachment adopted from a broker that pinned no map of
    maps: it serves socket leases only."""

    ifname: str
    ifindex: int
    mode: str
    queue_count: int
    map_fd: int
    queues_fd: int
    link_fd: int
    link_id: int
    prog_id: int
    pin_dir: Path
    adopted: bool
    checked_at: float = field(default_factory=time.monotonic)

    def is_live(self) -> bool:
        """False once the link no longer holds the device (removed, or detached by someone)."""
        try:
            return bpf.link_info(self.link_fd).ifindex == self.ifindex
        except OSError:
            return False

    def steer(self, queue_ids: list[int], map_fd: int) -> None:
        """Redirect queue_ids through the XSKMAP map_fd (a map lease's own); all or none."""
        try:
            bpf.map_fill(self.queues_fd, queue_ids, map_fd)
        except bpf.BpfError as exc:
            self.unsteer(queue_ids)
            raise AttachFailed(
                f"{self.ifname}: steering queues {queue_ids} to the lease's map: {exc.strerror}",
                errno=exc.errno,
            ) from None

    def unsteer(self, queue_ids: list[int]) -> None:
        """Redirect queue_ids through the shared XSKMAP again: a map lease's map, whoever
        still holds it, no longer receives anything.

        The slots get the shared map rather than being emptied: an ARRAY_OF_MAPS has no
        BPF_MAP_DELETE_BATCH (ENOTSUPP on 6.18) and each single delete waits out an RCU
        grace period, where one batch waits once; and the program of an older broker, which
        filled every slot at attach and passes frames of an empty one to the stack, may
        still be the one attached (adopted from its pins)."""
        with contextlib.suppress(OSError):
            bpf.map_fill(self.queues_fd, queue_ids, self.map_fd)

    def reconcile(self, kept: set[int]) -> list[int]:
        """Steer back to the shared XSKMAP every queue outside kept (the queues of the live
        map leases) whose slot holds another map, and return those queues: an earlier broker
        left them steered to a lease that ended while none ran, or to one it died before
        journaling. Nothing else would ever refill them, and the program falls back to the
        shared map only for an empty slot, so a socket lease there would get no frames.
        One batch update, as unsteer()'s; an empty slot stays empty."""
        if self.queues_fd < 0:
            return []
        try:
            shared = bpf.map_info(self.map_fd).map_id
            stray = [
                queue
                for queue in range(self.queue_count)
                if queue not in kept
                and bpf.inner_map_id(self.queues_fd, queue) not in (None, shared)
            ]
            bpf.map_fill(self.queues_fd, stray, self.map_fd)
        except bpf.BpfError as exc:
            raise AttachFailed(
                f"{self.ifname}: steering queues no live lease owns back to the shared map: "
                f"{exc.strerror}",
                errno=exc.errno,
            ) from None
        return stray

    def close(self) -> None:
        for fd in (self.map_fd, self.queues_fd, self.link_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def describe(self) -> AttachmentInfo:
        return AttachmentInfo(
            self.ifname,
            self.ifindex,
            self.mode,
            self.queue_count,
            self.link_id,
            self.prog_id,
            str(self.pin_dir),
            self.adopted,
        )


def netns_key() -> str:
    """An ifindex is only unique within a network namespace; pins are keyed by both."""
    return str(os.stat("/proc/self/ns/net").st_ino)


class Loader:
    """Keeps one Attachment per interface of the broker's network namespace."""

    def __init__(
        self, pin_root: Path = DEFAULT_PIN_ROOT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.pin_root = pin_root
        self.ns_dir = pin_root / netns_key()
        self.attachments: dict[int, Attachment] = {}
        self.clock = clock

    def ensure(
        self,
        ifname: str,
        mode: str = "auto",
        queue_ids: range = range(1),
        ifindex: int | None = None,
    ) -> Attachment:
        """The attachment for ifname (whose ifindex the caller may have looked up already):
        cached, adopted from pins, or attached now.

        Every check (queue range, mode) runs before anything is attached, so a refused
        request leaves the interface as it was.
        """
        ifindex = netdev.ifindex_of(ifname) if ifindex is None else ifindex
        current = self._current(ifindex, ifname)
        if current is None:
            state = netdev.link_state(ifindex)
            _check_link(state, ifname, queue_ids)
            current = self._attach(state, ifname, mode)
        self.attachments[ifindex] = current
        _check_attachment(current, ifname, mode, queue_ids)
        current.ifname = ifname
        return current

    def check(self, ifname: str, mode: str, queue_ids: range, ifindex: int) -> None:
        """Refuse what ensure() would refuse before it attaches (queues the device lacks, a
        mode other than its attachment's, another XDP program), attaching nothing: asked
        before the broker changes anything else for a request (a consumer's memlock limit)."""
        current = self._current(ifindex, ifname)
        if current is None:
            _check_link(netdev.link_state(ifindex), ifname, queue_ids)
        else:
            self.attachments[ifindex] = current
            _check_attachment(current, ifname, mode, queue_ids)

    def _current(self, ifindex: int, ifname: str) -> Attachment | None:
        """The live attachment of ifindex, cached or adopted from its pins; None if none."""
        current = self.attachments.get(ifindex)
        if current is not None and not self._still_live(current):
            self.forget(ifindex)
            current = None
        return current if current is not None else self._adopt(ifindex, ifname)

    def _still_live(self, attachment: Attachment) -> bool:
        """Whether a cached attachment still holds its device, asking the kernel at most
        once per LIVENESS_RECHECK seconds.

        A removed device (or one moved to another namespace) needs no asking: the link
        watch reports it (RTM_DELLINK) and the server forgets the attachment. Only a
        privileged process detaching the link itself (BPF_LINK_DETACH, `bpftool link
        detach`) goes unreported: the kernel sends no netlink event for it and a link fd
        cannot be polled. Asking on every request cost a bpf syscall per request and did not
        close that race either (the detach can come right after the check, or during a
        lease); asking once the last answer is a second old keeps the repair (the next
        request attaches anew) at one syscall per second under load.
        """
        now = self.clock()
        if now - attachment.checked_at < LIVENESS_RECHECK:
            return True
        attachment.checked_at = now
        return attachment.is_live()

    def adopt_all(self) -> list[Attachment]:
        """Pick up every pinned attachment after a restart; clean pins of vanished links."""
        if self.ns_dir.is_dir():
            for entry in sorted(self.ns_dir.iterdir()):
                if entry.name.isdigit():
                    self.adopt_one(int(entry.name))
        return list(self.attachments.values())

    def adopt_one(self, ifindex: int) -> bool:
        """Adopt ifindex's pins if they hold a live attachment; True if one is now held."""
        if ifindex not in self.attachments:
            found = self._adopt(ifindex, None)
            if found is not None:
                self.attachments[ifindex] = found
        return ifindex in self.attachments

    def forget(self, ifindex: int) -> None:
        """Drop a dead attachment: close fds and remove its pins."""
        attachment = self.attachments.pop(ifindex, None)
        if attachment is not None:
            attachment.close()
        remove_pins(self.ns_dir / str(ifindex))

    def detach(self, ifindex: int) -> None:
        """Remove the program from the device now, and its pins."""
        attachment = self.attachments.get(ifindex)
        if attachment is not None:
            with contextlib.suppress(OSError):
                bpf.detach_link(attachment.link_fd)
        self.forget(ifindex)

    def close(self) -> None:
        """Close the broker's fds; the pins keep the attachments alive."""
        for attachment in self.attachments.values():
            attachment.close()
        self.attachments.clear()

    def _adopt(self, ifindex: int, ifname: str | None) -> Attachment | None:
        pin_dir = self.ns_dir / str(ifindex)
        links = sorted(pin_dir.glob("link_*")) if pin_dir.is_dir() else []
        if not links:
            remove_pins(pin_dir)
            return None
        link_fd = map_fd = queues_fd = -1
        try:
            link_fd = bpf.get_pinned(str(links[0]))
            map_fd = bpf.get_pinned(str(pin_dir / "map"))
            info = bpf.link_info(link_fd)
            queue_count = bpf.map_info(map_fd).max_entries
            if (pin_dir / "queues").exists():
                queues_fd = bpf.get_pinned(str(pin_dir / "queues"))
        except OSError as exc:
            for fd in (link_fd, map_fd, queues_fd):
                if fd >= 0:
                    os.close(fd)
            if exc.errno != errno.ENOENT:  # EMFILE, ENOMEM...: the link may well be alive
                raise AttachFailed(
                    f"cannot open the pins in {pin_dir}: {exc.strerror}", errno=exc.errno
                ) from None
            info = None
        if info is None or info.ifindex != ifindex:
            if info is not None:
                for fd in (link_fd, map_fd, queues_fd):
                    if fd >= 0:
                        os.close(fd)
            remove_pins(pin_dir)  # a half-pinned or dead attachment
            return None
        if ifname is None:
            try:
                ifname = socket.if_indextoname(ifindex)
            except OSError:
                ifname = f"if{ifindex}"
        return Attachment(
            ifname=ifname,
            ifindex=ifindex,
            mode=links[0].name.removeprefix("link_"),
            queue_count=queue_count,
            map_fd=map_fd,
            queues_fd=queues_fd,
            link_fd=link_fd,
            link_id=info.link_id,
            prog_id=info.prog_id,
            pin_dir=pin_dir,
            adopted=True,
            checked_at=self.clock(),
        )

    def _attach(self, state: netdev.LinkState, ifname: str, mode: str) -> Attachment:
        ifindex = state.ifindex
        ensure_bpffs(self.pin_root)
        self.ns_dir.mkdir(mode=0o700, exist_ok=True)
        pin_dir = self.ns_dir / str(ifindex)
        remove_pins(pin_dir)
        map_fd = bpf.create_xskmap(f"xsks_{ifindex}", state.rx_queues)
        link_fd = queues_fd = -1
        try:
            queues_fd = bpf.create_map_of_maps(f"queues_{ifindex}", map_fd, state.rx_queues)
            prog_fd = xdpprog.load(queues_fd, map_fd)
            try:
                link_fd, used = _link_first_possible(prog_fd, ifindex, ifname, mode)
            finally:
                os.close(prog_fd)
            pin_dir.mkdir(mode=0o700)
            bpf.pin(map_fd, str(pin_dir / "map"))
            bpf.pin(queues_fd, str(pin_dir / "queues"))
            bpf.pin(link_fd, str(pin_dir / f"link_{used}"))
            info = bpf.link_info(link_fd)
        except BaseException:
            for fd in (map_fd, queues_fd, link_fd):
                if fd >= 0:
                    os.close(fd)
            remove_pins(pin_dir)
            raise
        return Attachment(
            ifname=ifname,
            ifindex=ifindex,
            mode=used,
            queue_count=state.rx_queues,
            map_fd=map_fd,
            queues_fd=queues_fd,
            link_fd=link_fd,
            link_id=info.link_id,
            prog_id=info.prog_id,
            pin_dir=pin_dir,
            adopted=False,
            checked_at=self.clock(),
        )


def _check_link(state: netdev.LinkState, ifname: str, queue_ids: range) -> None:
    """An interface without the broker's attachment: not loopback, the queues exist, no
    other program."""
    if state.loopback:
        raise Denied(
            f"{ifname} is a loopback interface: every local connection of the broker's "
            "network namespace passes it, so its queues are never handed out, whatever the "
            "policy says; give the consumer a veth, macvlan or NIC of its own"
        )
    check_queue_range(ifname, state.rx_queues, queue_ids)
    if state.xdp_mode is not None:
        raise XdpConflict(
            f"{ifname} already has another XDP program (id {state.xdp_prog_id}, "
            f"{state.xdp_mode} mode) attached; remove it (ip link set dev {ifname} xdp off) "
            "or let the broker own the interface"
        )


def _check_attachment(current: Attachment, ifname: str, mode: str, queue_ids: range) -> None:
    """An interface with the broker's attachment: the queues exist, the mode is its mode."""
    check_queue_range(ifname, current.queue_count, queue_ids)
    if mode not in ("auto", current.mode):
        raise ModeUnsupported(
            f"{ifname} already carries the XSK program in {current.mode} mode; "
            f"ask for mode={current.mode} or auto, or detach it first"
        )


def check_queue_range(ifname: str, queue_count: int, queue_ids: range) -> None:
    """Refuse queues the device does not have, naming the ones it has."""
    if queue_ids.stop > queue_count:
        raise BadQueues(
            f"{ifname} has {queue_count} rx queue(s) (0-{queue_count - 1}); "
            f"queues {queue_ids.start}-{queue_ids.stop - 1} were asked for"
        )


def _link_first_possible(prog_fd: int, ifindex: int, ifname: str, mode: str) -> tuple[int, str]:
    """Attach in the wished mode, or native then skb for auto; say why each was refused."""
    tried: list[str] = []
    for candidate in ("native", "skb") if mode == "auto" else (mode,):
        try:
            return bpf.create_xdp_link(prog_fd, ifindex, MODE_FLAGS[candidate]), candidate
        except bpf.BpfError as exc:
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                raise XdpConflict(
                    f"{ifname}: the kernel refused the attach ({exc.strerror}); another XDP "
                    "program or link holds the interface",
                    errno=exc.errno,
                ) from None
            if exc.errno not in _MODE_REFUSALS:
                raise AttachFailed(f"{ifname}: {exc.strerror}", errno=exc.errno) from None
            tried.append(f"{candidate}: {exc.strerror}")
    raise ModeUnsupported(f"{ifname} cannot take an XDP program in {' or '.join(tried)}")
