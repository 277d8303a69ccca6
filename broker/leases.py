"""What was handed to whom, until the consumer process exits.

Each lease holds a pidfd on its consumer: it becomes readable when the process exits, and
unlike a pid it cannot be fooled by pid reuse. Every change is appended to a journal in the
runtime directory (one write() of one JSON line, before the reply goes out) so that a
restarted broker can re-open the pidfds, checking each process's start time, and keep
refusing leased queues. broker.journal reads back only valid records; restore compacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from broker import journal, procinfo
from broker.errors import BrokerError
from broker.journal import Added, Entry
from broker.protocol import LeaseInfo


@dataclass
class LiveLease:
    """A live lease: its description, and the pidfd that ends it."""

    info: LeaseInfo
    pidfd: int
    start_time: int

    def key_queues(self) -> list[tuple[int, int]]:
        return [(self.info.ifindex, queue) for queue in self.info.queue_ids]


class LeaseTable:
    """Leases by id and by (ifindex, queue), journaled to state_dir when one is given."""

    def __init__(self, state_dir: Path | None) -> None:
        self.state_dir = state_dir
        self.by_id: dict[str, LiveLease] = {}
        self.by_queue: dict[tuple[int, int], LiveLease] = {}
        self._journal: int | None = None
        self._journal_lines = 0

    def holder(self, ifindex: int, queue: int) -> LiveLease | None:
        return self.by_queue.get((ifindex, queue))

    def holders(self, ifindex: int, queue_ids: list[int]) -> list[LiveLease]:
        found = {id(lease): lease for q in queue_ids if (lease := self.holder(ifindex, q))}
        return list(found.values())

    def add(self, lease: LiveLease) -> None:
        """Hold lease; one the journal could not record is not held (and its pidfd is left
        to the caller)."""
        self._index(lease)
        try:
            self._append(_added(lease))
        except BaseException:
            self._unindex(lease.info.lease_id)
            raise

    def end(self, lease_id: str) -> LiveLease | None:
        """Forget a lease and close its pidfd; the consumer's sockets are not touched."""
        lease = self._unindex(lease_id)
        if lease is None:
            return None
        with contextlib.suppress(OSError):
            os.close(lease.pidfd)
        self._append({"end": lease_id})
        return lease

    def rename(self, ifindex: int, ifname: str) -> list[LiveLease]:
        """Give ifindex's leases its new name, journaled (a later record of a lease id
        replaces the earlier one on replay); returns the leases renamed."""
        renamed = [
            lease
            for lease in self.by_id.values()
            if lease.info.ifindex == ifindex and lease.info.ifname != ifname
        ]
        for lease in renamed:
            lease.info = dataclasses.replace(lease.info, ifname=ifname)
            self._append(_added(lease))
        return renamed

    def by_pidfd(self, pidfd: int) -> list[LiveLease]:
        return [lease for lease in self.by_id.values() if lease.pidfd == pidfd]

    def queues_held_by(self, uid: int) -> int:
        """Queues in live leases that uid asked for (the policy's per-uid limit)."""
        return sum(
            len(lease.info.queue_ids) for lease in self.by_id.values() if lease.info.uid == uid
        )

    def held_bytes(self, consumer_uid: int) -> int:
        """UMEM bytes the uid may already have locked through live leases."""
        return sum(
            lease.info.umem_bytes * len(lease.info.queue_ids)
            for lease in self.by_id.values()
            if lease.info.consumer_uid == consumer_uid
        )

    def restore(self, stored_pidfds: dict[str, int] | None = None) -> list[LeaseInfo]:
        """Replay the journal of an earlier broker; returns the leases that ended meanwhile.

        stored_pidfds (by lease id) are the earlier broker's own pidfds, kept in systemd's
        fd store: they cannot be fooled by pid reuse. Without one, the pid is re-opened and
        its start time checked. A lease whose consumer exited is ended. The journal is then
        rewritten to hold just the live leases.
        """
        stored = dict(stored_pidfds or {})
        records: dict[str, Added] = {}
        for entry in journal.read(self.state_dir) if self.state_dir else ():
            if "add" in entry:
                records[entry["add"]["lease_id"]] = entry
            elif (ended_id := entry.get("end")) is not None:
                records.pop(ended_id, None)
        ended: list[LeaseInfo] = []
        for record in records.values():
            info = LeaseInfo.from_wire(record["add"])
            pidfd = _alive(stored.pop(info.lease_id, None))
            if pidfd is None:
                pidfd = _reopen(info.consumer_pid, record["start_time"])
            if pidfd is None:
                ended.append(info)
            else:
                self._index(LiveLease(info, pidfd, record["start_time"]))
        for fd in stored.values():
            os.close(fd)
        self._compact()
        return ended

    def close(self) -> None:
        """Close the pidfds without ending the leases (the journal keeps them)."""
        for lease in self.by_id.values():
            with contextlib.suppress(OSError):
                os.close(lease.pidfd)
        self.by_id.clear()
        self.by_queue.clear()
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    def _unindex(self, lease_id: str) -> LiveLease | None:
        lease = self.by_id.pop(lease_id, None)
        for key in lease.key_queues() if lease else ():
            if self.by_queue.get(key) is lease:
                del self.by_queue[key]
        return lease

    def _index(self, lease: LiveLease) -> None:
        self.by_id[lease.info.lease_id] = lease
        for key in lease.key_queues():
            self.by_queue[key] = lease

    def _append(self, entry: Entry) -> None:
        """One line per change; rewritten to the live leases once mostly history, so a busy
        broker's journal (in RAM, on /run) stays in proportion to its leases."""
        if self._journal is None:
            return
        os.write(self._journal, _line(entry))
        self._journal_lines += 1
        if self._journal_lines > 2 * len(self.by_id) + 64:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal with only live leases (atomically), then append to it."""
        if self.state_dir is None:
            return
        lines = [_line(_added(lease)) for lease in self.by_id.values()]
        fd = journal.rewrite(self.state_dir, lines)
        if self._journal is not None:
            os.close(self._journal)
        self._journal = fd
        self._journal_lines = len(lines)


def _line(entry: Entry) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def _added(lease: LiveLease) -> Added:
    return {"add": lease.info.to_wire(), "start_time": lease.start_time}


def _alive(pidfd: int | None) -> int | None:
    """pidfd if its process still runs."""
    if pidfd is None or not procinfo.pidfd_exited(pidfd):
        return pidfd
    os.close(pidfd)
    return None


def _reopen(pid: int, start_time: int) -> int | None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        same = procinfo.start_time(pid, pidfd) == start_time
    except (BrokerError, OSError, ValueError):
        same = False
    if not same:
        os.close(pidfd)
        return None
    return pidfd
