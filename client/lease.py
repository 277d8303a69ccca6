"""A lease as the client holds it: the broker's description plus the received fds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from broker.fdpass import close_all
from broker.protocol import LeaseInfo, netdev_value

# QMP's netdev_add arguments for an af-xdp netdev (NetdevAFXDPOptions plus type and id).
NetdevQmpArgs = TypedDict(
    "NetdevQmpArgs",
    {
        "type": Literal["af-xdp"],
        "id": str,
        "ifname": str,
        "mode": str,
        "queues": int,
        "start-queue": int,
        "inhibit": bool,
        "sock-fds": str,
    },
)


@dataclass
class Lease:
    """Sockets for queue_ids, fds[i] serving queue_ids[i]; closing it closes the fds.

    The lease on the broker's side lasts until the consumer process exits, not until this
    object is closed: pass the fds to QEMU and close them here.
    """

    info: LeaseInfo
    fds: list[int]
    _closed: bool = field(default=False, repr=False)

    @property
    def lease_id(self) -> str:
        return self.info.lease_id

    @property
    def ifname(self) -> str:
        return self.info.ifname

    @property
    def ifindex(self) -> int:
        return self.info.ifindex

    @property
    def mode(self) -> str:
        return self.info.mode

    @property
    def queue_ids(self) -> list[int]:
        return list(self.info.queue_ids)

    @property
    def start_queue(self) -> int:
        return self.info.start_queue

    @property
    def sock_fds(self) -> str:
        """The fds as QEMU's `sock-fds=` wants them: `a:b:c` in queue order."""
        return ":".join(str(fd) for fd in self.fds)

    def netdev_arg(self, netdev_id: str = "net0") -> str:
        """The complete `-netdev` value for a QEMU that inherits these fd numbers."""
        return netdev_value(netdev_id, self.info, self.sock_fds)

    def netdev_qmp(self, netdev_id: str, fd_names: list[str]) -> NetdevQmpArgs:
        """`netdev_add` arguments for these sockets once sent to QEMU with `getfd` names."""
        if len(fd_names) != len(self.info.queue_ids):
            raise ValueError(f"{len(self.info.queue_ids)} queues need as many fd names")
        return {
            "type": "af-xdp",
            "id": netdev_id,
            "ifname": self.ifname,
            "mode": self.mode,
            "queues": len(self.info.queue_ids),
            "start-queue": self.start_queue,
            "inhibit": True,
            "sock-fds": ":".join(fd_names),
        }

    def make_inheritable(self) -> None:
        """Let the fds survive exec (they arrive close-on-exec)."""
        for fd in self.fds:
            os.set_inheritable(fd, True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            close_all(self.fds)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
