"""polkit delegation against a real dbus-daemon and a real polkitd (tests/polkit_env.py).

polkitd runs the project's example rules: group xsk-users may request veth*/xdp-* queues,
xsk-admins may use admin ops, everyone else gets nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from polkit_env import USERS, PolkitEnv, gid_of, missing_prerequisites, polkit_env
from support import Spawn, actor, pidfd_of_dead, run_captured

from broker import polkit
from broker.errors import ConsumerGone, Denied
from broker.policy import ADMIN_ACTION, REQUEST_ACTION, Caller, Policy
from broker.protocol import Request

pytestmark = [
    pytest.mark.kernel,  # processes of the test users, a private mount namespace
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
]


ProcessOf = Callable[[str], subprocess.Popen[bytes]]


@pytest.fixture(scope="module")
def env() -> Iterator[PolkitEnv]:
    with polkit_env() as running:
        yield running


@pytest.fixture
def process_of(spawn: Spawn) -> ProcessOf:
    """Real processes running as a test user with that user's primary gid."""

    def start(user: str) -> subprocess.Popen[bytes]:
        return spawn(user=USERS[user][0], group=gid_of(user), extra_groups=[])

    return start


def _check(
    env: PolkitEnv, child: subprocess.Popen[bytes], user: str, action: str, details: dict[str, str]
) -> polkit.Granted:
    subject = polkit.subject_of(child.pid, USERS[user][0])
    return polkit.check(subject, action, details, bus_address=env.bus_address)


def _details(ifname: str, queues: int = 2) -> dict[str, str]:
    return polkit.request_details(Request(ifname, queues), 4242, 61001)


def test_granted_group_is_granted(env: PolkitEnv, process_of: ProcessOf) -> None:
    child = process_of("xsktest-user")
    granted = _check(env, child, "xsktest-user", REQUEST_ACTION, _details("veth0"))
    assert granted.action_id == REQUEST_ACTION


def test_other_group_is_denied(env: PolkitEnv, process_of: ProcessOf) -> None:
    child = process_of("xsktest-other")
    with pytest.raises(Denied, match=rf"polkit denies {REQUEST_ACTION} to pid {child.pid}"):
        _check(env, child, "xsktest-other", REQUEST_ACTION, _details("veth0"))


def test_rules_see_the_details(env: PolkitEnv, process_of: ProcessOf) -> None:
    """The example rule allows only veth*/xdp-* and at most 4 queues."""
    child = process_of("xsktest-user")
    for details in (_details("eth0"), _details("veth0", queues=5)):
        with pytest.raises(Denied, match="polkit denies"):
            _check(env, child, "xsktest-user", REQUEST_ACTION, details)


def test_admin_action(env: PolkitEnv, process_of: ProcessOf) -> None:
    admin, user = process_of("xsktest-admin"), process_of("xsktest-user")
    details = {"op": "revoke", "lease_id": "l-1", "interface": "veth0"}
    _check(env, admin, "xsktest-admin", ADMIN_ACTION, details)
    with pytest.raises(Denied):
        _check(env, user, "xsktest-user", ADMIN_ACTION, details)


def test_recycled_pid_is_refused(env: PolkitEnv, process_of: ProcessOf) -> None:
    """A start time that does not match the process under that pid is what pid reuse
    looks like to polkitd; it refuses rather than judging the new process."""
    child = process_of("xsktest-user")
    subject = polkit.subject_of(child.pid, USERS["xsktest-user"][0])
    stale = polkit.Subject(subject.pid, subject.start_time + 1, subject.uid)
    with pytest.raises(Denied, match="has been replaced"):
        polkit.check(stale, REQUEST_ACTION, _details("veth0"), bus_address=env.bus_address)


def test_subject_read_through_a_dead_pidfd_is_refused(process_of: ProcessOf) -> None:
    child = process_of("xsktest-user")
    with pidfd_of_dead(child) as pidfd, pytest.raises(ConsumerGone):
        polkit.subject_of(os.getpid(), 0, pidfd)


def test_policy_delegates_and_polkit_decides(
    env: PolkitEnv, process_of: ProcessOf, tmp_path: Path
) -> None:
    """The server's path: the policy grant names the polkit action, polkit answers it."""
    path = tmp_path / "policy.toml"
    path.write_text("[[allow]]\ngroups = [61001, 61002]\npolkit = true\n")
    policy = Policy.load(path)
    for user, allowed in (("xsktest-user", True), ("xsktest-other", False)):
        child = process_of(user)
        uid = USERS[user][0]
        caller = Caller(uid, gid_of(user), (), child.pid)
        request = Request("veth0", 2)
        grant = policy.authorize(caller, request, queues_held_by_uid=0, consumer_uid=uid)
        assert grant.polkit_action == REQUEST_ACTION
        subject = polkit.subject_of(caller.pid, caller.uid)
        details = polkit.request_details(request, child.pid, uid)
        if allowed:
            polkit.check(subject, grant.polkit_action, details, bus_address=env.bus_address)
        else:
            with pytest.raises(Denied):
                polkit.check(subject, grant.polkit_action, details, bus_address=env.bus_address)


def test_stopped_polkitd_means_denied_with_reason(env: PolkitEnv, process_of: ProcessOf) -> None:
    child = process_of("xsktest-user")
    env.stop_polkitd()
    try:
        with pytest.raises(Denied, match=r"polkit is unreachable: .*ServiceUnknown"):
            _check(env, child, "xsktest-user", REQUEST_ACTION, _details("veth0"))
    finally:
        env.start_polkitd()
    _check(env, child, "xsktest-user", REQUEST_ACTION, _details("veth0"))


def test_missing_bus_means_denied_with_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The address also comes from DBUS_SYSTEM_BUS_ADDRESS, as for every system-bus client."""
    monkeypatch.setenv(polkit.BUS_ENV, f"unix:path={tmp_path}/no-bus")
    subject = polkit.subject_of(os.getpid(), 0)
    with pytest.raises(Denied, match=r"polkit is unreachable: system bus .*no-bus"):
        polkit.check(subject, REQUEST_ACTION, {}, timeout=1)


@pytest.mark.parametrize(
    ("checker", "outcome"),
    [("xsk-broker", "granted"), ("xsktest-other", "Only trusted callers")],
)
def test_only_the_broker_user_may_ask_about_others(
    env: PolkitEnv, process_of: ProcessOf, checker: str, outcome: str
) -> None:
    """The broker runs as user xsk-broker: the action file names it as the actions' owner,
    which is what lets polkitd answer it about another process (root is always allowed)."""
    child = process_of("xsktest-user")
    uid = USERS[checker][0]
    done = run_captured(
        actor("polkit_check", str(child.pid), env.bus_address),
        user=uid,
        group=gid_of(checker),
        extra_groups=[],
        check=True,
    )
    assert outcome in done.stdout, done.stdout + done.stderr
