"""The policy file: loading, refusal of broken files, and every kind of decision."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polkit_env import USERS, identities
from support import REPO, actor, run_captured

from broker.errors import BadRequest, Denied
from broker.policy import (
    ADMIN_ACTION,
    REQUEST_ACTION,
    Caller,
    Grant,
    Policy,
    PolicyError,
)
from broker.protocol import Request
from xsk_broker.policycheck import explain
from xsk_broker.policycheck import main as policy_check_main

ALICE = Caller(uid=1000, gid=1000, groups=(), pid=4242)
BASE = """
[[deny]]
name = "quarantine"
groups = [1002]

[[allow]]
name = "vm-hosts"
users = [1000]
groups = [2000]
interfaces = ["veth*", "xdp-*"]
queues = [0, "2-5"]
max_queues_per_lease = 2
max_queues_per_uid = 3
modes = ["skb"]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return path


def load(tmp_path: Path, text: str = BASE) -> Policy:
    return Policy.load(write(tmp_path, "policy.toml", text))


def ask(
    policy: Policy,
    caller: Caller = ALICE,
    held: int = 0,
    consumer_uid: int | None = None,
    **request: Any,
) -> Grant:
    fields = {"ifname": "veth0", "queues": 1, **request}
    return policy.authorize(
        caller,
        Request(**fields),
        queues_held_by_uid=held,
        consumer_uid=caller.uid if consumer_uid is None else consumer_uid,
    )


def test_allowed_user_is_granted(tmp_path: Path) -> None:
    grant = ask(load(tmp_path))
    assert grant.rule == "allow rule 'vm-hosts' (policy.toml:6)"
    assert grant.mode == "skb"
    assert grant.polkit_action is None and not grant.raise_memlock


def test_user_outside_the_policy_is_denied_naming_the_outcome(tmp_path: Path) -> None:
    policy = load(tmp_path)
    with pytest.raises(Denied) as caught:
        ask(policy, Caller(54321, 54321, (), 1))
    assert caught.value.message == f"uid 54321 matches no allow rule in {tmp_path / 'policy.toml'}"
    assert caught.value.code == "DENIED"


def test_empty_policy_denies_everyone(tmp_path: Path) -> None:
    with pytest.raises(Denied, match="matches no allow rule"):
        ask(load(tmp_path, ""), Caller(0, 0, (), 1))


def test_deny_beats_allow(tmp_path: Path) -> None:
    quarantined = Caller(1000, 1000, (1002,), 1)
    with pytest.raises(Denied) as caught:
        ask(load(tmp_path), quarantined)
    assert caught.value.message == "deny rule 'quarantine' (policy.toml:2) matches group 1002"


def test_deny_limited_to_interfaces(tmp_path: Path) -> None:
    policy = load(tmp_path, BASE + '\n[[deny]]\nusers = [1000]\ninterfaces = ["veth9"]\n')
    ask(policy, ifname="veth0")
    with pytest.raises(Denied, match=r"deny rule #2 \(policy.toml:16\) matches uid 1000"):
        ask(policy, ifname="veth9")


def test_supplementary_group_matches(tmp_path: Path) -> None:
    bob = Caller(1500, 1500, (27, 2000), 1)
    assert ask(load(tmp_path), bob).rule.startswith("allow rule 'vm-hosts'")


@pytest.mark.parametrize(
    ("request_fields", "held", "reason"),
    [
        ({"ifname": "eth0"}, 0, "interface eth0 is not in veth*, xdp-*"),
        ({"start_queue": 1}, 0, "queues 1-1 are not within 0, 2-5"),
        ({"start_queue": 5, "queues": 2}, 0, "queues 5-6 are not within 0, 2-5"),
        ({"start_queue": 2, "queues": 3}, 0, "3 queues exceed its 2 per lease"),
        (
            {"start_queue": 2, "queues": 2},
            2,
            "uid 1000 holds 2 queues; 2 more exceed its 3 per uid",
        ),
        ({"mode": "native"}, 0, "mode native is not in skb"),
    ],
)
def test_limits(tmp_path: Path, request_fields: dict[str, Any], held: int, reason: str) -> None:
    with pytest.raises(Denied) as caught:
        ask(load(tmp_path), held=held, **request_fields)
    assert caught.value.message.endswith(f"allow rule 'vm-hosts' (policy.toml:6): {reason}")


def test_within_limits(tmp_path: Path) -> None:
    policy = load(tmp_path)
    ask(policy, start_queue=2, queues=2, held=1)
    ask(policy, start_queue=4, queues=2, mode="skb")


def test_consumer_of_another_uid(tmp_path: Path) -> None:
    with pytest.raises(Denied, match="consumer runs as uid 107, not as the caller's uid 1000"):
        ask(load(tmp_path), consumer_uid=107)
    manager = load(tmp_path, "[[allow]]\nusers = [1000]\nother_consumers = true\n")
    ask(manager, consumer_uid=107)


def test_first_permitting_rule_decides_and_all_refusals_are_named(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        BASE + '\n[[allow]]\nname = "wide"\nusers = ["*"]\ninterfaces = ["eth*"]\npolkit = true\n'
        "raise_memlock = true\n",
    )
    grant = ask(policy, ifname="eth1", queues=8)
    assert grant.rule == "allow rule 'wide' (policy.toml:16)"
    assert grant.polkit_action == REQUEST_ACTION and grant.raise_memlock
    assert grant.mode == "auto"
    with pytest.raises(Denied) as caught:
        ask(policy, ifname="lo")
    assert "'vm-hosts' (policy.toml:6): interface lo" in caught.value.message
    assert "'wide' (policy.toml:16): interface lo" in caught.value.message


def test_admin_ops(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        BASE + '\n[[allow]]\nname = "ops"\ngroups = [3000]\nadmin = true\npolkit = true\n',
    )
    operator = Caller(1700, 1700, (3000,), 1)
    assert policy.authorize_admin(operator, "revoke", ifname="eth0").polkit_action == ADMIN_ACTION
    assert policy.authorize_admin(operator, "detach").rule == "allow rule 'ops' (policy.toml:16)"
    with pytest.raises(Denied, match="no allow rule with admin = true for revoke on veth0"):
        policy.authorize_admin(ALICE, "revoke", ifname="veth0")
    with pytest.raises(Denied, match="deny rule 'quarantine'"):
        policy.authorize_admin(Caller(1700, 1700, (3000, 1002), 1), "detach")
    with pytest.raises(BadRequest):
        policy.authorize_admin(operator, "format-disk")


def test_names_are_resolved(tmp_path: Path) -> None:
    policy = load(tmp_path, '[[allow]]\nusers = ["daemon"]\ngroups = ["nogroup"]\n')
    ask(policy, Caller(1, 1, (), 1))
    ask(policy, Caller(5000, 5000, (65534,), 1))


def test_include_relative_globs_and_order(tmp_path: Path) -> None:
    write(tmp_path, "policy.d/10-a.toml", '[[allow]]\nname = "a"\nusers = [1000]\n')
    write(tmp_path, "policy.d/20-b.toml", '[[deny]]\nname = "b"\nusers = [1001]\n')
    write(tmp_path, "extra.toml", 'include = ["policy.d/*.toml", "policy.d/none-*.toml"]\n')
    policy = load(tmp_path, 'include = ["extra.toml"]\n[[allow]]\nname = "top"\nusers = [1001]\n')
    assert [p.name for p in policy.files] == ["policy.toml", "extra.toml", "10-a.toml", "20-b.toml"]
    assert ask(policy).rule == "allow rule 'a' (10-a.toml:1)"
    with pytest.raises(Denied, match=r"deny rule 'b' \(20-b.toml:1\) matches uid 1001"):
        ask(policy, Caller(1001, 1001, (), 1))


def test_include_loop_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "b.toml", 'include = ["policy.toml"]\n')
    with pytest.raises(
        PolicyError, match=r"include loop: .*policy.toml -> .*b.toml -> .*policy.toml"
    ):
        load(tmp_path, 'include = ["b.toml"]\n')


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("[[allow]]\nusers = [1000\n", 2, "Unclosed array (at end of document)"),
        ('[[allow]]\nusers = [1000]\nname = "x" junk\n', 3, "at line 3, column 12"),
        ('[[allow]]\nusers = [1000]\nqueues = ["3-1"]\n', 3, "queues: '3-1' is not a queue"),
        ('\n[[allow]]\nusers = [1000]\nmodes = ["auto"]\n', 4, "modes: 'auto' is not one of"),
        ("[[allow]]\nusers = [1000]\n\n[[deny]]\nusers = [1]\nadmin = true\n", 6, "unknown key"),
        (
            '[[allow]]\nusers = [1000]\n[[allow]]\ngroups = ["no-such-group-x"]\n',
            4,
            "does not exist",
        ),
        ('[[allow]]\nname = "x"\n', 1, "matches nobody"),
        ("[[allow]]\nusers = [1]\nmax_queues_per_uid = 0\n", 3, "positive whole number"),
        ('[[allow]]\nusers = [1]\npolkit = "yes"\n', 3, "must be true or false"),
        ("allowed = 1\n", 1, "unknown key 'allowed'"),
        ('include = ["missing.toml"]\n', 1, "does not exist"),
    ],
)
def test_broken_file_names_file_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    path = write(tmp_path, "policy.toml", text)
    with pytest.raises(PolicyError) as caught:
        Policy.load(path)
    error = caught.value
    assert (error.file, error.line, error.code) == (path, line, "BAD_POLICY")
    assert reason in error.reason
    assert str(error).startswith(f"BAD_POLICY: {path}:{line}: ")


def test_broken_included_file_is_named(tmp_path: Path) -> None:
    write(tmp_path, "d/bad.toml", "[[deny]]\n\nusers = 7\n")
    with pytest.raises(PolicyError, match=r"d/bad.toml:3: deny rule: users: must be a list"):
        load(tmp_path, 'include = ["d/*.toml"]\n')


def test_unsafe_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.toml", "")
    path.chmod(0o666)
    with pytest.raises(PolicyError, match="writable by group or others"):
        Policy.load(path)
    os.chown(path, 1000, 1000)
    path.chmod(0o644)
    with pytest.raises(PolicyError, match="owned by uid 1000"):
        Policy.load(path)


def test_check_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "policy.toml", BASE)
    assert policy_check_main(path, None) == 0
    assert "1 allow and 1 deny rule(s)" in capsys.readouterr().out
    assert policy_check_main(path, "1000") == 0
    out = capsys.readouterr().out
    assert "allow rule 'vm-hosts' (policy.toml:6) matches uid 1000" in out
    assert "queues 0, 2-5" in out
    assert policy_check_main(path, "no-such-user-x") == 2
    write(tmp_path, "policy.toml", "[[allow]\n")
    assert policy_check_main(path, None) == 1
    assert "policy.toml:1" in capsys.readouterr().err


def test_check_main_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "policy.toml", BASE)
    assert policy_check_main(path, "1000", as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["allow_rules"], report["deny_rules"], report["caller"]["uid"]) == (1, 1, 1000)
    assert any("matches uid 1000" in line for line in report["explanation"])


def test_check_warns_of_a_rule_that_covers_every_interface(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid, exit 0, but named: a rule without `interfaces` also hands out the uplink."""
    path = write(tmp_path, "policy.toml", '[[allow]]\nname = "wide"\nusers = [1000]\n')
    assert policy_check_main(path, None) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: allow rule 'wide' (policy.toml:1) covers every interface"), err
    assert policy_check_main(path, None, as_json=True) == 0
    assert len(json.loads(capsys.readouterr().out)["warnings"]) == 1
    write(tmp_path, "policy.toml", BASE)
    assert policy_check_main(path, None) == 0
    assert capsys.readouterr().err == ""


def test_explain_shows_deny(tmp_path: Path) -> None:
    text = explain(load(tmp_path), Caller(1000, 1000, (1002,), 0))
    assert "DENIED by deny rule 'quarantine' (policy.toml:2) (matches group 1002)" in text


@pytest.mark.kernel  # a mount namespace for the test users
def test_example_policy_with_its_groups() -> None:
    """The shipped example loads once its groups exist, and explains real users."""
    example = REPO / "examples" / "policy.toml"
    with identities() as ids:
        for user, expected in (
            ("xsktest-user", "allow rule 'vm-hosts' (policy.toml:26) matches group 61001"),
            ("xsktest-admin", "admin ops (revoke, detach): yes"),
            ("xsktest-quarantined", "DENIED by deny rule 'quarantine'"),
            ("xsktest-other", "no allow rule matches"),
        ):
            done = run_captured(ids.namespaced(actor("policy_check", str(example), user)))
            assert done.returncode == 0, done.stderr
            assert expected in done.stdout, (user, USERS[user], done.stdout)


# Property tests: rules generated over a small universe of ids and interfaces.
IDS = st.integers(1000, 1004)
NAMES = st.sampled_from(["veth0", "veth1", "eth0", "xdp-a"])
PATTERNS = st.lists(st.sampled_from(["veth*", "eth0", "xdp-*", "*"]), min_size=1, max_size=2)
ALLOW = st.fixed_dictionaries(
    {
        "users": st.lists(IDS, min_size=1, max_size=2),
        "interfaces": PATTERNS,
        "queues": st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=2),
        "max_queues_per_lease": st.integers(1, 4),
        "max_queues_per_uid": st.integers(1, 6),
    }
)
DENY = st.fixed_dictionaries(
    {"groups": st.lists(IDS, min_size=1, max_size=2), "interfaces": PATTERNS}
)
REQUESTS = st.builds(Request, NAMES, st.integers(1, 4), st.integers(0, 4))
CALLERS = st.builds(Caller, IDS, IDS, st.lists(IDS, max_size=2).map(tuple), st.just(1))


def to_toml(kind: str, table: dict[str, Any]) -> str:
    lines = [f"[[{kind}]]"]
    for key, value in table.items():
        if key == "queues":
            value = [f"{min(r)}-{max(r)}" for r in value]
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def decide(policy: Policy, caller: Caller, request: Request, held: int) -> Grant | None:
    try:
        return policy.authorize(caller, request, queues_held_by_uid=held, consumer_uid=caller.uid)
    except Denied:
        return None


@settings(max_examples=150, deadline=None)
@given(
    allow=st.lists(ALLOW, max_size=3),
    deny=st.lists(DENY, max_size=2),
    caller=CALLERS,
    request=REQUESTS,
    held=st.integers(0, 4),
)
def test_property_grants_respect_the_granting_rule(
    tmp_path_factory: pytest.TempPathFactory,
    allow: list[dict[str, Any]],
    deny: list[dict[str, Any]],
    caller: Caller,
    request: Request,
    held: int,
) -> None:
    """Whatever the rules: a grant never exceeds the rule it names, no deny rule matching the
    caller on that interface exists, and splitting the file into includes changes nothing."""
    directory = tmp_path_factory.mktemp("prop")
    text = "".join(to_toml("allow", t) for t in allow) + "".join(to_toml("deny", t) for t in deny)
    whole = Policy.load(write(directory, "whole.toml", text))
    grant = decide(whole, caller, request, held)
    if grant is not None:
        rule = next(r for r in whole.allow if r.label == grant.rule)
        first, last = request.start_queue, request.start_queue + request.queues - 1
        assert rule.identity_match(caller) and rule.covers(request.ifname)
        assert any(lo <= first and last <= hi for lo, hi in rule.queues)
        assert request.queues <= rule.max_queues_per_lease
        assert rule.max_queues_per_uid is not None  # ALLOW always sets it
        assert held + request.queues <= rule.max_queues_per_uid
        assert not any(d.identity_match(caller) and d.covers(request.ifname) for d in whole.deny)
    parts = [write(directory, f"p/{i}.toml", to_toml("allow", t)) for i, t in enumerate(allow)]
    parts += [write(directory, f"p/d{i}.toml", to_toml("deny", t)) for i, t in enumerate(deny)]
    includes = ", ".join(f'"p/{p.name}"' for p in parts)
    split = Policy.load(write(directory, "split.toml", f"include = [{includes}]\n"))
    assert (decide(split, caller, request, held) is None) == (grant is None)


@settings(max_examples=100, deadline=None)
@given(allow=st.lists(ALLOW, min_size=1, max_size=3), caller=CALLERS, request=REQUESTS)
def test_property_a_matching_deny_rule_always_wins(
    tmp_path_factory: pytest.TempPathFactory,
    allow: list[dict[str, Any]],
    caller: Caller,
    request: Request,
) -> None:
    directory = tmp_path_factory.mktemp("deny")
    everyone = "".join(to_toml("allow", {**t, "users": ["*"]}) for t in allow)
    text = everyone + to_toml("deny", {"users": [caller.uid], "interfaces": ["*"]})
    with pytest.raises(Denied, match="deny rule"):
        Policy.load(write(directory, "p.toml", text)).authorize(
            caller, request, queues_held_by_uid=0, consumer_uid=caller.uid
        )
