"""AF_XDP sockets for a lease: create, pin to the device, insert into the map, roll back.

The broker never registers a UMEM or binds: the consumer (QEMU) does both. It only makes the
unbound socket, fixes it to the interface's ifindex with SO_BINDTOIFINDEX (SO_BINDTODEVICE by
index, which the consumer cannot undo without CAP_NET_RAW), and puts it in the XSKMAP slot
of its queue.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from broker import bpf
from broker.errors import AttachFailed, QueueBusy
from broker.loader import Attachment

AF_XDP = 44
SO_BINDTOIFINDEX = 62


def _new_socket(ifindex: int) -> int:
    """By ifindex, not name: the attachment's map is the ifindex's, and a name can pass to
    another interface (a rename) between the request's lookup and this call."""
    sock = socket.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTOIFINDEX, ifindex)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def create_sockets(attachment: Attachment, queue_ids: list[int]) -> list[int]:
    """One unbound socket per queue, each already in its map slot; all or nothing.

    BPF_NOEXIST makes an occupied slot (another lease, or a socket someone else put there)
    fail instead of being silently replaced.
    """
    fds: list[int] = []
    inserted: list[int] = []
    try:
        for queue in queue_ids:
            try:
                fds.append(_new_socket(attachment.ifindex))
            except OSError as exc:
                raise AttachFailed(
                    f"creating the AF_XDP socket for {attachment.ifname} queue {queue}: "
                    f"{exc.strerror}",
                    errno=exc.errno,
                ) from None
            try:
                bpf.map_update(attachment.map_fd, queue, fds[-1], bpf.BPF_NOEXIST)
            except bpf.BpfError as exc:
                if exc.errno == errno.EEXIST:
                    raise QueueBusy(
                        f"queue {queue} of {attachment.ifname} is occupied by a socket the "
                        "broker did not hand out in a live lease (another process holds it)"
                    ) from None
                raise AttachFailed(
                    f"inserting the socket for {attachment.ifname} queue {queue}: {exc.strerror}",
                    errno=exc.errno,
                ) from None
            inserted.append(queue)
    except BaseException:
        release_slots(attachment, inserted)
        for fd in fds:
            os.close(fd)
        raise
    return fds


def release_slots(attachment: Attachment, queue_ids: list[int]) -> None:
    """Empty map slots now, so the queues' traffic returns to the kernel stack."""
    for queue in queue_ids:
        with contextlib.suppress(OSError):
            bpf.map_delete(attachment.map_fd, queue)
