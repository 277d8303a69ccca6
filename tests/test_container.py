"""The shipped units under a real systemd (PID 1 in a systemd-nspawn container).

One boot for the whole module; see tests/container.py for the harness.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from container import CLIENT_USER, EXEC_PATH, SOURCE_MOUNT, BootedContainer
from support import actor

from broker import caps
from lab.brokerproc import wait_until

THREE = {"net_admin", "bpf", "net_raw"}

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def box() -> Iterator[BootedContainer]:
    with BootedContainer() as booted:
        print(f"\ncontainer booted and units installed in {booted.boot_seconds:.2f} s")
        yield booted


def test_units_verify_clean_inside(box: BootedContainer) -> None:
    done = box.exec(["systemd-analyze", "verify", "xsk-broker.socket", "xsk-broker.service"])
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


def test_socket_unit_listens_with_mode_0660_and_group_xsk_broker(box: BootedContainer) -> None:
    assert box.show("xsk-broker.socket", "ActiveState") == {"ActiveState": "active"}
    done = box.exec(["stat", "-c", "%a %U %G %F", "/run/xsk-broker/broker.sock"], check=True)
    assert done.stdout.split(maxsplit=3) == ["660", "root", "xsk-broker", "socket\n"]


def test_first_connection_starts_the_service_as_its_user_with_exactly_three_caps(
    box: BootedContainer,
) -> None:
    assert box.show("xsk-broker.service", "ActiveState")["ActiveState"] == "inactive"
    client = box.add_user()
    started = time.monotonic()
    cold = box.run([EXEC_PATH, "ping"], user=CLIENT_USER)
    cold_ms = (time.monotonic() - started) * 1000
    assert cold.returncode == 0, cold.stderr + box.exec(["journalctl", "-u", "xsk-broker"]).stdout
    started = time.monotonic()
    assert box.run([EXEC_PATH, "ping"], user=client).returncode == 0
    warm_ms = (time.monotonic() - started) * 1000
    print(
        f"\nping via systemd-run: cold (socket activation) {cold_ms:.0f} ms, warm {warm_ms:.0f} ms"
    )

    service = box.show("xsk-broker.service", "ActiveState", "MainPID", "StatusText")
    assert service["ActiveState"] == "active"
    assert "lease" in service["StatusText"]
    status = box.exec(["cat", f"/proc/{service['MainPID']}/status"], check=True).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines())
    uid = box.exec(["id", "-u", "xsk-broker"], check=True).stdout.strip()
    assert fields["Uid"].split() == [uid] * 4
    assert fields["NoNewPrivs"] == "1"
    sets = caps.parse_status(status)
    assert sets["CapEff"] == sets["CapPrm"] == sets["CapBnd"] == THREE
    assert sets["CapAmb"] <= THREE
    assert sets["CapInh"] <= THREE


def test_a_user_outside_group_xsk_broker_cannot_connect(box: BootedContainer) -> None:
    done = box.run([EXEC_PATH, "ping"], user="nobody")
    assert done.returncode != 0
    assert "ermission denied" in done.stderr or "EACCES" in done.stderr, done.stderr


def test_the_service_logs_structured_entries_to_the_journal(box: BootedContainer) -> None:
    entries = box.journal("_SYSTEMD_UNIT=xsk-broker.service", "SYSLOG_IDENTIFIER=xsk-broker")
    assert entries, box.exec(["journalctl", "-u", "xsk-broker"]).stdout
    # Set by the JournalHandler only: the lines did not arrive as plain stderr text.
    assert all("LOGGER" in entry and "CODE_FUNC" in entry for entry in entries)


def test_log_event_fields_are_journal_fields(box: BootedContainer) -> None:
    box.exec(
        [
            "systemd-run",
            "--wait",
            "--quiet",
            "--collect",
            *actor(
                "journal_event",
                python="/opt/xsk-broker/bin/python3",
                checkout=Path(SOURCE_MOUNT),
            ),
        ],
        check=True,
    )
    entries = box.journal("INTERFACE=xskt-a")
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["MESSAGE"], entry["QUEUES"], entry["UID"], entry["LEASE"]) == (
        "granted",
        "0,1",
        "1000",
        "L1",
    )
    assert entry["SYSLOG_IDENTIFIER"] == "xsk-broker"


ESCAPED = "x\\n1999-01-01 FORGED\\r\\x1b[2J\\x00\\u202e\\ud800\\u2028y"


def test_client_text_reaches_the_journal_escaped(box: BootedContainer) -> None:
    """Newline, CR, ESC, NUL, a bidi override, a lone surrogate and a line separator in a
    message, a field and an exception: each journal entry carries them as escapes (journalctl
    would show a field with raw control bytes as a byte array, not text)."""
    box.exec(
        [
            "systemd-run", "--wait", "--quiet", "--collect", "--unit=xskt-hostile",
            *actor("journal_hostile", python="/opt/xsk-broker/bin/python3",
                   checkout=Path(SOURCE_MOUNT)),
        ],
        check=True,
    )  # fmt: skip
    wait_until(lambda: len(box.journal("_SYSTEMD_UNIT=xskt-hostile.service")) >= 3)
    entries = box.journal("_SYSTEMD_UNIT=xskt-hostile.service")
    messages = [entry["MESSAGE"] for entry in entries]
    assert all(isinstance(message, str) for message in messages), messages
    assert f"denied {ESCAPED}" in messages and f"refused {ESCAPED}" in messages
    (event,) = [entry for entry in entries if entry.get("INTERFACE") == "xskt-hostile"]
    assert event["TAG"] == ESCAPED
    (failure,) = [m for m in messages if m.startswith("internal error")]
    assert failure.splitlines()[-1] == f"ValueError: {ESCAPED}"
    assert not any(line.startswith("1999") for m in messages for line in m.splitlines())


def test_the_sandboxed_service_attaches_and_hands_out_sockets_on_a_veth(
    box: BootedContainer,
) -> None:
    """The unit's sandbox (address families, syscall filter, ReadWritePaths for bpffs,
    ProcSubset=pid) leaves the broker able to do its whole job."""
    box.add_user()
    box.add_veth("xskt-sb", "xskt-sbp")
    done = box.run(
        [EXEC_PATH, "request", "--ifname", "xskt-sb", "--queues", "1", "--umem-bytes",
         "1048576", "--", "echo", "{netdev}"],
        user=CLIENT_USER,
    )  # fmt: skip
    # The host's hard RLIMIT_MEMLOCK (8 MiB) caps LimitMEMLOCK=, so a small UMEM is declared.
    assert done.returncode == 0, done.stderr + box.exec(["journalctl", "-u", "xsk-broker"]).stdout
    assert done.stdout.startswith("af-xdp,id=net0,ifname=xskt-sb,mode=")
    assert "xskt-sb/" in box.show("xsk-broker.service", "StatusText")["StatusText"]
    pins = box.exec(["find", "/sys/fs/bpf/xsk-broker", "-type", "f"], check=True).stdout
    assert pins.strip(), "no pins under the service's bpffs directory"


def test_systemctl_reload_rereads_the_policy(box: BootedContainer) -> None:
    box.add_user()
    assert box.run([EXEC_PATH, "ping"], user=CLIENT_USER).returncode == 0
    box.exec(["systemctl", "reload", "xsk-broker.service"], check=True)
    wait_until(
        lambda: (
            "policy reloaded" in box.exec(["journalctl", "-u", "xsk-broker", "-o", "cat"]).stdout
        )
    )


def test_the_sandboxed_service_writes_metrics_where_operations_md_says(
    box: BootedContainer,
) -> None:
    """The drop-in of docs/operations.md: the unit's sandbox (ProtectSystem=strict,
    UMask=0077, the syscall filter) lets the broker write its runtime directory, and the
    file is readable by node_exporter's user."""
    prom = "/run/xsk-broker/xsk-broker.prom"
    dropin = box.path("/etc/systemd/system/xsk-broker.service.d/metrics.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    serve = f"{EXEC_PATH} serve --idle-exit 600 --metrics-file {prom}"
    dropin.write_text(f"[Service]\nExecStart=\nExecStart={serve}\n")
    try:
        box.exec(["systemctl", "daemon-reload"], check=True)
        box.exec(["systemctl", "stop", "xsk-broker.service"], check=True)
        box.add_user()
        assert box.run([EXEC_PATH, "ping"], user=CLIENT_USER).returncode == 0
        wait_until(lambda: "xsk_broker_up 1" in box.exec(["cat", prom]).stdout, timeout=60)
        stat = box.exec(["stat", "-c", "%a %U", prom], check=True).stdout.split()
        assert stat == ["644", "xsk-broker"]
        ping = 'xsk_broker_request_duration_seconds_count{op="ping"}'
        wait_until(lambda: ping in box.exec(["cat", prom]).stdout, timeout=60)
        box.exec(["systemctl", "stop", "xsk-broker.service"], check=True)
        assert "xsk_broker_up 0" in box.exec(["cat", prom], check=True).stdout
    finally:
        dropin.unlink()
        box.exec(["systemctl", "daemon-reload"], check=True)
