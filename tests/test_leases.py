"""The lease journal on its own: restart records and bounded size."""

from __future__ import annotations

import os
from pathlib import Path

from broker.journal import STATE_FILE
from broker.leases import LeaseTable, LiveLease
from broker.protocol import LeaseInfo


def test_journal_stays_in_proportion_to_live_leases(tmp_path: Path) -> None:
    """A busy broker never idles long enough to compact at start, so appends compact."""
    table = LeaseTable(tmp_path)
    table.restore()
    keeper = LeaseInfo("ffffffffffff", "veth0", 3, [0], "skb", consumer_pid=os.getpid())
    table.add(LiveLease(keeper, os.pidfd_open(os.getpid()), 1))
    for n in range(1000):
        info = LeaseInfo(f"{n:012x}", "veth0", 3, [1], "skb", consumer_pid=os.getpid())
        table.add(LiveLease(info, os.pidfd_open(os.getpid()), 1))
        table.end(info.lease_id)
    lines = (tmp_path / STATE_FILE).read_text().splitlines()
    assert len(lines) <= 2 * len(table.by_id) + 65
    assert any(keeper.lease_id in line for line in lines)
    table.close()
