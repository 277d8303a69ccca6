"""`xsk-broker doctor` against a real broker, a missing one, and unprivileged callers."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
from support import actor, run_captured

from broker.bpffs import is_bpffs
from lab.brokerproc import REPO, BrokerProcess
from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID, run_unprivileged, spawn_unprivileged
from xsk_broker.doctor import Check, check_memlock, check_xdp_links, doctor_main, run_checks

pytestmark = pytest.mark.kernel


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name.split(" of pid ")[0]: check for check in checks}


def doctor_child(
    argv_prefix: list[str], socket_path: Path, queues: int = 1
) -> dict[str, dict[str, Any]]:
    argv = [*argv_prefix, *actor("doctor_checks", str(socket_path), str(queues))]
    result = run_captured(argv, check=True)
    checks: dict[str, dict[str, Any]] = json.loads(result.stdout)
    return checks


def as_uid(uid: int, socket_path: Path, queues: int = 1) -> dict[str, dict[str, Any]]:
    result = run_unprivileged(
        actor("doctor_checks", str(socket_path), str(queues)),
        uid,
        uid,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    checks: dict[str, dict[str, Any]] = json.loads(result.stdout)
    return checks


def test_real_broker_passes_every_check_but_a_missing_host_bpffs(
    broker4: BrokerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = run_checks(str(broker4.socket_path), None, None, 4)
    seen = by_name(checks)
    version = importlib.metadata.version("xsk-broker")
    assert seen["broker reachable"].detail == f"xsk-broker {version} pid {broker4.pid}"
    assert (
        seen["broker capabilities"].detail
        == f"pid {broker4.pid} holds exactly bpf,net_admin,net_raw"
    )
    assert seen["broker bounding set"].detail == "bpf,net_admin,net_raw"
    assert seen["broker no_new_privs"].detail == "NoNewPrivs 1"
    assert seen["memlock"].detail == "has CAP_IPC_LOCK: no limit applies"
    host_bpffs = is_bpffs(Path("/sys/fs/bpf"))
    assert seen["bpffs"].ok == host_bpffs
    assert [c.name for c in checks if not c.ok] == ([] if host_bpffs else ["bpffs"])
    opts = argparse.Namespace(
        socket=str(broker4.socket_path), policy=None, pid=None, queues=4, json=False
    )
    assert doctor_main(opts) == (0 if host_bpffs else 1)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [check.line() for check in checks]
    assert all(line.startswith(("OK   ", "FAIL ")) for line in lines)


def test_bpffs_is_seen_where_mounted() -> None:
    """In a private mount namespace, so the host's /sys/fs/bpf is never touched."""
    script = 'mount -t bpf xskt-bpf /sys/fs/bpf && exec "$@"'
    seen = doctor_child(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"],
        Path("/nonexistent"),
    )
    assert seen["bpffs"] == {
        "name": "bpffs",
        "ok": True,
        "detail": "mounted at /sys/fs/bpf",
        "fix": "",
    }


def test_missing_socket_fails_with_fixes_and_exit_1(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = workdir / "broker.sock"
    opts = argparse.Namespace(socket=str(missing), policy=None, pid=None, queues=1, json=True)
    assert doctor_main(opts) == 1
    seen = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert not seen["socket permissions"]["ok"]
    assert seen["socket permissions"]["detail"] == f"{missing}: No such file or directory"
    assert seen["broker reachable"]["detail"].startswith("BROKER_UNREACHABLE at ")
    assert "xsk-broker.socket" in seen["broker reachable"]["fix"]
    for name in ("broker capabilities", "broker bounding set", "broker no_new_privs"):
        assert not seen[name]["ok"] and seen[name]["detail"].startswith("not checked")
    assert seen["kernel AF_XDP"]["ok"] and seen["kernel XDP links"]["ok"]


def test_unprivileged_member_may_connect_and_needs_more_memlock(broker4: BrokerProcess) -> None:
    seen = as_uid(UNPRIVILEGED_UID, broker4.socket_path, queues=2)
    assert seen["kernel AF_XDP"]["detail"] == "supported (creating sockets needs CAP_NET_RAW)"
    assert seen["socket permissions"]["ok"], seen["socket permissions"]
    assert seen["broker reachable"]["ok"] and seen["broker capabilities"]["ok"]
    (memlock,) = [v for k, v in seen.items() if k.startswith("memlock of pid")]
    assert not memlock["ok"]
    assert memlock["detail"] == "RLIMIT_MEMLOCK is 8 MiB; 2 queue(s) need 64 MiB"
    assert memlock["fix"].startswith(
        "LimitMEMLOCK=67108864 in the consumer's unit, `ulimit -l 65536`"
    )


def test_user_outside_the_socket_group_is_told_which_group(broker4: BrokerProcess) -> None:
    seen = as_uid(UNPRIVILEGED_UID + 1, broker4.socket_path)
    check = seen["socket permissions"]
    assert not check["ok"]
    assert check["detail"].endswith(
        f"srw-rw---- root:{UNPRIVILEGED_GID}: uid 61001 may not connect"
    )
    assert check["fix"].startswith(f"add the user to group {UNPRIVILEGED_GID} ")
    assert not seen["broker reachable"]["ok"]


def test_memlock_of_another_process_counts_leases_of_its_uid() -> None:
    with spawn_unprivileged(["sleep", "30"]) as child:
        try:
            check = check_memlock(child.pid, 1, held_bytes=32 << 20)
        finally:
            child.kill()
    assert check.name == f"memlock of pid {child.pid}"
    assert not check.ok
    assert (
        check.detail == "RLIMIT_MEMLOCK is 8 MiB; 1 queue(s) need 32 MiB + 32 MiB held by uid 61000"
    )


def test_kernels_without_xdp_links_are_named() -> None:
    old = check_xdp_links("5.4.0-150-generic")
    assert not old.ok and old.fix == "upgrade to Linux 5.9 or later"
    assert check_xdp_links("5.9.0").ok


@pytest.mark.parametrize(
    ("text", "ok", "detail"),
    [
        ("[[allow]\n", False, ":1: "),
        ("", False, ": 0 allow, 0 deny rule(s) in 1 file(s): nothing is allowed"),
        (
            '[[allow]]\nusers = [61000]\n[[deny]]\ngroups = ["*"]\ninterfaces = ["eth0"]\n',
            True,
            ": 1 allow, 1 deny rule(s) in 1 file(s)",
        ),
    ],
    ids=["broken", "empty", "valid"],
)
def test_policy_file_is_loaded_as_the_broker_would(
    workdir: Path, text: str, ok: bool, detail: str
) -> None:
    pytest.importorskip("broker.policy", reason="doctor checks policies once broker.policy exists")
    path = workdir / "policy.toml"
    path.write_text(text)
    check = by_name(run_checks(str(workdir / "none.sock"), str(path), None, 1))["policy"]
    assert check.ok == ok
    assert check.detail.startswith(str(path)) and detail in check.detail, check.detail
