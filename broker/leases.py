"""What was handed to whom, until the consumer process exits.

Each lease holds a pidfd on its consumer: it becomes readable when the process exits, and
unlike a pid it cannot be fooled by pid reuse. The table is written to the runtime directory
after every change so that a restarted broker can re-open the pidfds (checking each
process's start time) and keep refusing leased queues.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from broker.protocol import LeaseInfo

STATE_FILE = "leases.json"


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat, in clock ticks since boot; (pid, start) names a process."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return int(text[text.rindex(b")") + 2 :].split()[19])


@dataclass
class Lease:
    """A live lease: its description, and the pidfd that ends it."""

    info: LeaseInfo
    pidfd: int
    start_time: int

    def key_queues(self) -> list[tuple[int, int]]:
        return [(self.info.ifindex, queue) for queue in self.info.queue_ids]


def new_lease_id() -> str:
    return secrets.token_hex(6)


class LeaseTable:
    """Leases by id and by (ifindex, queue), persisted to state_dir when one is given."""

    def __init__(self, state_dir: Path | None) -> None:
        self.state_path = state_dir / STATE_FILE if state_dir else None
        self.by_id: dict[str, Lease] = {}
        self.by_queue: dict[tuple[int, int], Lease] = {}

    def holder(self, ifindex: int, queue: int) -> Lease | None:
        return self.by_queue.get((ifindex, queue))

    def holders(self, ifindex: int, queue_ids: list[int]) -> list[Lease]:
        found = {id(lease): lease for q in queue_ids if (lease := self.holder(ifindex, q))}
        return list(found.values())

    def add(self, lease: Lease) -> None:
        self.by_id[lease.info.lease_id] = lease
        for key in lease.key_queues():
            self.by_queue[key] = lease
        self.save()

    def end(self, lease_id: str) -> Lease | None:
        """Forget a lease and close its pidfd; the consumer's sockets are not touched."""
        lease = self.by_id.pop(lease_id, None)
        if lease is None:
            return None
        for key in lease.key_queues():
            if self.by_queue.get(key) is lease:
                del self.by_queue[key]
        with contextlib.suppress(OSError):
            os.close(lease.pidfd)
        self.save()
        return lease

    def by_pidfd(self, pidfd: int) -> list[Lease]:
        return [lease for lease in self.by_id.values() if lease.pidfd == pidfd]

    def held_bytes(self, consumer_uid: int) -> int:
        """UMEM bytes the uid may already have locked through live leases."""
        return sum(
            lease.info.umem_bytes * len(lease.info.queue_ids)
            for lease in self.by_id.values()
            if lease.info.extra.get("consumer_uid") == consumer_uid
        )

    def save(self) -> None:
        """Write the table atomically (rename), so a crash never leaves half a file."""
        if self.state_path is None:
            return
        records = [
            {"info": asdict(lease.info), "start_time": lease.start_time}
            for lease in self.by_id.values()
        ]
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, self.state_path)

    def restore(self) -> list[LeaseInfo]:
        """Re-open the pidfds of leases recorded by an earlier broker; returns those that ended.

        A lease whose consumer exited (or whose pid now names another process) is ended.
        """
        if self.state_path is None or not self.state_path.exists():
            return []
        try:
            records = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            records = []
        ended: list[LeaseInfo] = []
        for record in records:
            info = LeaseInfo.from_wire(record["info"])
            pidfd = _reopen(info.consumer_pid, record["start_time"])
            if pidfd is None:
                ended.append(info)
                continue
            lease = Lease(info, pidfd, record["start_time"])
            self.by_id[info.lease_id] = lease
            for key in lease.key_queues():
                self.by_queue[key] = lease
        self.save()
        return ended

    def close(self) -> None:
        """Close the pidfds without ending the leases (the state file keeps them)."""
        for lease in self.by_id.values():
            with contextlib.suppress(OSError):
                os.close(lease.pidfd)
        self.by_id.clear()
        self.by_queue.clear()


def _reopen(pid: int, start_time: int) -> int | None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        same = process_start_time(pid) == start_time
    except (OSError, ValueError):
        same = False
    if not same:
        os.close(pidfd)
        return None
    return pidfd
