"""Directories and files the broker trusts cannot be turned against it (issue 10, finding 2).

Each attack is made as it would be: by a real process of another uid (ATTACKER, no
capabilities, not in the socket's group), in a directory that uid made or can write. The
broker must refuse to start (or refuse the include) with one line naming the path, its owner
and its mode, and the refusal must leave nothing behind: no socket, no state file, no pin
directory, no mount.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import BrokerFactory, actor, piped, run_captured, xsk_cli

from broker import procinfo
from broker.errors import UntrustedBroker
from broker.journal import STATE_FILE, TEMP_FILE
from broker.leases import LeaseTable
from broker.policy import Policy, PolicyError
from broker.protocol import LeaseInfo
from broker.trust import UntrustedPath
from client.aio import AsyncClient
from lab.brokerproc import LAB_POLICY, REPO, BrokerProcess, wait_until
from lab.netlab import VethLab, run_unprivileged, spawn_unprivileged
from lab.traffic import client_env

pytestmark = pytest.mark.kernel
ATTACKER = 61002  # with gid 61002: outside the lab socket's group 61000
MIB = 1 << 20


def as_attacker(*move: str) -> None:
    """One filesystem move (tests/actors/plant.py) made by the attacker's own process."""
    done = run_unprivileged(actor("plant", *move), ATTACKER, ATTACKER, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": True}, f"{move}: {done.stdout}"


@pytest.fixture
def attack_dir() -> Iterator[Path]:
    """A directory under /tmp that the attacker made, as it may before any broker runs."""
    path = Path(f"/tmp/xskt-attack-{os.urandom(4).hex()}")
    as_attacker("mkdir", str(path), "0755")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mounts_under(*paths: Path) -> list[str]:
    """Mount points at or below paths (from /proc/self/mountinfo)."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if any(p == str(path) or p.startswith(f"{path}/") for path in paths)]


def serve(workdir: Path, pin_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`xsk-broker serve` (in a network namespace of its own) that is expected to refuse:
    one that starts instead is stopped, and the test fails."""
    argv = [
        "unshare", "--net", sys.executable, "-m", "xsk_broker", "serve", "--allow-root",
        "--socket", str(workdir / "broker.sock"), "--state-dir", str(workdir / "state"),
        "--pin-dir", str(pin_root), "--policy", str(workdir / "policy.toml"), *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate()
        pytest.fail(f"the broker started instead of refusing: {err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def assert_refused(done: subprocess.CompletedProcess[str], path: Path, uid: int, mode: str) -> None:
    """One line with the code, naming the path at fault, its owner and its mode."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("UNTRUSTED_PATH: "), lines[0]
    assert f" {path} is owned by uid {uid} " in lines[0], lines[0]
    assert f"with mode {mode} " in lines[0], lines[0]


def assert_nothing_made(*paths: Path) -> None:
    for path in paths:
        assert not os.path.lexists(path), f"the refusal left {path}"
    assert mounts_under(*paths) == []


# -- the socket's directory ------------------------------------------------------------------


def test_socket_directory_another_uid_made_is_refused(
    attack_dir: Path, workdir: Path, pin_root: Path
) -> None:
    """Bound there, the attacker could rename the socket away and answer root's ping with
    its own; the broker refuses to bind in it."""
    done = serve(workdir, pin_root, "--socket", str(attack_dir / "broker.sock"))
    assert_refused(done, attack_dir, ATTACKER, "0755")
    assert_nothing_made(attack_dir / "broker.sock", workdir / "state", pin_root)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_socket_directory_others_can_write_is_refused(
    workdir: Path, pin_root: Path, mode: int
) -> None:
    """Root's own directory, but writable by group or others: sticky is not enough, since
    anyone may take the socket's name in /tmp before the broker does."""
    shared = workdir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    os.chown(shared, 0, 61000)
    done = serve(workdir, pin_root, "--socket", str(shared / "broker.sock"))
    assert_refused(done, shared, 0, f"{mode:04o}")
    assert_nothing_made(shared / "broker.sock", workdir / "state", pin_root)


def test_socket_directory_reached_through_another_uids_link_is_refused(
    workdir: Path, pin_root: Path
) -> None:
    """The link lives in sticky /tmp, the directory it names is root's own: but the link's
    owner can point it elsewhere whenever it likes, and clients follow the path."""
    link = Path(f"/tmp/xskt-attack-{os.urandom(4).hex()}")
    as_attacker("symlink", str(workdir), str(link))
    try:
        done = serve(workdir, pin_root, "--socket", str(link / "broker.sock"))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith(
            f"UNTRUSTED_PATH: socket directory: {link} is owned by uid {ATTACKER} with mode "
            "0777 (a link not owned by root"
        )
        assert_nothing_made(workdir / "broker.sock", workdir / "state", pin_root)
    finally:
        link.unlink()


def test_socket_mode_and_group_never_go_through_a_link(
    lab4: VethLab, pin_root: Path, workdir: Path
) -> None:
    """chmod() and chown() of the socket's path would follow a link swapped in after bind():
    the mode comes from the umask at bind() and the group is set with lchown (strace says
    which calls were made)."""
    trace = workdir / "strace.out"
    broker = BrokerProcess(lab4.ns_a, pin_root, workdir)
    calls_traced = "trace=/^(f|l)?ch(mod|own)"
    # strace detaches from its tracee and exits on SIGTERM, so BrokerProcess.stop() alone
    # would leave the broker running: it is stopped itself below, and setpriv's pdeathsig
    # stops it should strace end first on any other path.
    broker.argv = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", str(trace), "-e", calls_traced,
                   "setpriv", "--pdeathsig=TERM", "--", *broker.argv]  # fmt: skip
    with broker:
        try:
            info = broker.socket_path.stat()
        finally:
            children = Path(f"/proc/{broker.pid}/task/{broker.pid}/children").read_text()
            traced = os.pidfd_open(int(children.split()[0]))
            try:
                signal.pidfd_send_signal(traced, signal.SIGTERM)
                assert select.select([traced], [], [], 60)[0], "the traced broker did not stop"
            finally:
                os.close(traced)
    calls = [line for line in trace.read_text().splitlines() if "broker.sock" in line]
    assert calls, "the group is set through the path"
    for call in calls:
        assert "chmod" not in call, call
        assert call.split()[1].startswith("lchown(") or "AT_SYMLINK_NOFOLLOW" in call, call
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, 61000)


@pytest.fixture
def impostor(attack_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """The attacker's own socket at attack_dir/broker.sock, answering like a broker would.

    Where the broker refused to bind, such a socket may still wait: root's ping was once
    answered by the attacker's process."""
    proc = spawn_unprivileged(
        actor("impostor", str(attack_dir / "broker.sock")), ATTACKER, ATTACKER,
        cwd=str(REPO), text=True, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert piped(proc.stdout).readline().strip() == "listening"
        yield proc
        assert json.loads(piped(proc.stdout).readline()) == {"request_seen": False}
    finally:
        proc.kill()
        proc.wait()


def refusal_of(impostor: subprocess.Popen[str], path: Path) -> str:
    return (
        f"UNTRUSTED_BROKER: the process listening on {path} (pid {impostor.pid}) runs as uid "
        f"{ATTACKER}, not as root or this user"
    )


def test_cli_refuses_a_listener_of_another_uid_before_sending(
    impostor: subprocess.Popen[str], attack_dir: Path
) -> None:
    path = attack_dir / "broker.sock"
    done = xsk_cli("ping", "--socket", str(path))
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith(refusal_of(impostor, path)), done.stderr


def test_async_client_refuses_a_listener_of_another_uid_before_sending(
    impostor: subprocess.Popen[str], attack_dir: Path
) -> None:
    path = attack_dir / "broker.sock"
    with pytest.raises(UntrustedBroker) as refused:
        asyncio.run(AsyncClient(path).ping())
    assert str(refused.value).startswith(refusal_of(impostor, path))


# -- the state directory and the lease journal -----------------------------------------------


def forged_record() -> str:
    forged = LeaseInfo("f0f0f0f0f0f0", "eth0", 2, [2], "native", uid=0, consumer_pid=1,
                       tag=f"forged-by-{ATTACKER}", consumer_uid=0)  # fmt: skip
    return json.dumps({"add": forged.to_wire(), "start_time": procinfo.start_time(1)}) + "\n"


def test_state_directory_another_uid_made_cannot_forge_a_lease(
    attack_dir: Path, workdir: Path, pin_root: Path
) -> None:
    as_attacker("write", str(attack_dir / STATE_FILE), forged_record())
    done = serve(workdir, pin_root, "--state-dir", str(attack_dir))
    assert_refused(done, attack_dir, ATTACKER, "0755")
    assert sorted(p.name for p in attack_dir.iterdir()) == [STATE_FILE]
    assert (attack_dir / STATE_FILE).read_text() == forged_record()
    assert_nothing_made(workdir / "broker.sock", pin_root)


def test_state_directory_others_can_write_cannot_make_the_broker_overwrite_a_file(
    workdir: Path, pin_root: Path
) -> None:
    """A link planted at the temporary file's name once made compaction write a root-owned
    file; a directory others can write is refused before anything is written."""
    precious = workdir / "precious"
    precious.write_text("root's own\n")
    precious.chmod(0o600)
    state = workdir / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    as_attacker("symlink", str(precious), str(state / TEMP_FILE))
    done = serve(workdir, pin_root)
    assert_refused(done, state, 0, "0777")
    assert precious.read_text() == "root's own\n"
    assert sorted(p.name for p in state.iterdir()) == [TEMP_FILE]
    assert_nothing_made(workdir / "broker.sock", pin_root)


def own_lease(lease_id: str = "0123456789ab", **fields: Any) -> dict[str, Any]:
    """A journal record for a lease held by this test's process (so restore keeps it)."""
    info = LeaseInfo(lease_id, "veth0", 3, [0, 1], "skb", 0, os.getpid(), os.getpid(),
                     consumer_uid=0)  # fmt: skip
    body = info.to_wire() | fields
    return {"add": body, "start_time": procinfo.start_time(os.getpid())}


def test_stale_temporary_link_is_replaced_never_written_through(tmp_path: Path) -> None:
    state, precious = tmp_path / "state", tmp_path / "precious"
    state.mkdir()
    precious.write_text("root's own\n")
    (state / TEMP_FILE).symlink_to(precious)
    (state / STATE_FILE).write_text(json.dumps(own_lease()) + "\n")
    table = LeaseTable(state)
    table.restore()
    table.end("0123456789ab")
    table.close()
    assert precious.read_text() == "root's own\n"
    assert not (state / TEMP_FILE).exists()
    assert stat.S_ISREG((state / STATE_FILE).lstat().st_mode)


def test_journal_records_are_checked_and_bad_ones_are_logged_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [
        own_lease("bbbbbbbbbb01", queue_ids="0"),
        own_lease("bbbbbbbbbb02", mode="evil"),
        own_lease("bbbbbbbbbb03", uid=-1),
        own_lease("bbbbbbbbbb04", tag="\x1b[2J\nFAKE LOG LINE"),
        own_lease("bbbbbbbbbb05", ifname="../etc"),
        own_lease("bbbbbbbbbb06", queue_ids=[0, 7]),
        own_lease("bbbbbbbbbb07", umem_bytes=True),
        own_lease("bbbbbbbbbb08", smuggled=1),
        {**own_lease("bbbbbbbbbb09"), "start_time": "now"},
        {"add": {"lease_id": "bbbbbbbbbb10"}, "start_time": 1},
        {"end": "\x1b]0;x\x07"},
        {"end": "0123456789ab", "and": "more"},
        ["not", "an", "object"],
    ]
    lines = [json.dumps(record) for record in bad] + [json.dumps(own_lease()), "{torn"]
    (tmp_path / STATE_FILE).write_text("\n".join(lines))
    table = LeaseTable(tmp_path)
    with caplog.at_level(logging.WARNING, logger="xsk-broker"):
        assert table.restore() == []
    assert list(table.by_id) == ["0123456789ab"]
    table.close()
    skipped = [r.getMessage() for r in caplog.records if "record skipped" in r.getMessage()]
    assert len(skipped) == len(bad) + 1, skipped
    assert not any(re.search(r"[\x00-\x1f\x7f]", message) for message in skipped), skipped


@pytest.mark.parametrize("damage", ["others can write it", "another uid owns it", "a link"])
def test_journal_another_uid_could_have_written_refuses_start(tmp_path: Path, damage: str) -> None:
    journal = tmp_path / STATE_FILE
    (tmp_path / "elsewhere").write_text(json.dumps(own_lease()) + "\n")
    if damage == "a link":
        journal.symlink_to(tmp_path / "elsewhere")
    else:
        (tmp_path / "elsewhere").rename(journal)
        journal.chmod(0o666 if damage == "others can write it" else 0o600)
        if damage == "another uid owns it":
            os.chown(journal, ATTACKER, ATTACKER)
    table = LeaseTable(tmp_path)
    with pytest.raises(UntrustedPath, match=re.escape(f"lease journal: {journal} is owned by ")):
        table.restore()
    assert table.by_id == {}


def test_journal_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """An older journal that others could read is rewritten 0600 at start; new ones are."""
    (tmp_path / STATE_FILE).write_text(json.dumps(own_lease()) + "\n")
    (tmp_path / STATE_FILE).chmod(0o644)
    old = os.umask(0o022)
    try:
        table = LeaseTable(tmp_path)
        table.restore()
        assert stat.S_IMODE((tmp_path / STATE_FILE).stat().st_mode) == 0o600
        table.close()
    finally:
        os.umask(old)


def test_journal_of_a_broker_started_by_hand_is_unreadable_to_other_uids(
    lab4: VethLab, pin_root: Path, workdir: Path
) -> None:
    """Run by hand with umask 022 the journal was 0644: a uid outside the socket's group
    read the VM names from it."""
    old = os.umask(0o022)
    try:
        broker = BrokerProcess(lab4.ns_a, pin_root, workdir).start()
    finally:
        os.umask(old)
    try:
        journal = broker.state_dir / STATE_FILE
        with broker.client().request(lab4.ifname_a, 1, tag="vm-secret", umem_bytes=MIB):
            assert "vm-secret" in journal.read_text()
            peek = run_unprivileged(["cat", str(journal)], ATTACKER, ATTACKER)
        assert peek.returncode != 0 and "vm-secret" not in peek.stdout
        assert "Permission denied" in peek.stderr
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    finally:
        broker.stop()


# -- the pin root ----------------------------------------------------------------------------


def test_pin_root_another_uid_made_is_refused(workdir: Path, pin_root: Path) -> None:
    """A bpffs mounted without mode= is 1777: another uid could make the pin root first,
    and then move the pins so that a restarted broker lost its live lease."""
    as_attacker("mkdir", str(pin_root), "0755")
    done = serve(workdir, pin_root)
    assert_refused(done, pin_root, ATTACKER, "0755")
    assert list(pin_root.iterdir()) == []
    assert_nothing_made(workdir / "broker.sock", workdir / "state")


def test_pin_root_others_can_write_is_refused(workdir: Path, pin_root: Path) -> None:
    pin_root.mkdir()
    pin_root.chmod(0o777)
    done = serve(workdir, pin_root)
    assert_refused(done, pin_root, 0, "0777")
    assert_nothing_made(workdir / "broker.sock", workdir / "state")


def test_broker_mounts_its_bpffs_closed_to_other_uids() -> None:
    """In a private mount namespace with /sys/fs/bpf unmounted: the broker's mount is 0700,
    and another uid cannot make a directory in it (in a 1777 bpffs it could)."""
    script = (
        'umount /sys/fs/bpf 2>/dev/null; "$@" || exit; '
        f"setpriv --reuid={ATTACKER} --regid={ATTACKER} --clear-groups "
        "mkdir /sys/fs/bpf/xskt-attack 2>/dev/null && echo made || echo refused"
    )
    done = run_captured(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         *actor("mount_bpffs")]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report, attacker = done.stdout.splitlines()
    assert json.loads(report)["mode"] == "1700"  # bpffs always sets the sticky bit on its root
    assert attacker == "refused"


# -- the policy file and its includes --------------------------------------------------------

DENY_ATTACKER = f'[[deny]]\nname = "no-attacker"\nusers = [{ATTACKER}]\n'


def policy_tree(root: Path, includes_mode: int = 0o755) -> Path:
    """root/policy.toml that allows everyone but includes conf.d/*.toml, which denies the
    attacker."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    top = root / "policy.toml"
    top.write_text('include = ["conf.d/*.toml"]\n' + LAB_POLICY)
    (root / "conf.d").mkdir()
    (root / "conf.d" / "deny.toml").write_text(DENY_ATTACKER)
    (root / "conf.d").chmod(includes_mode)
    return top


def assert_policy_refused(top: Path, path: Path, uid: int, mode: int) -> None:
    """Loading top fails with BAD_POLICY naming path, its owner and its mode."""
    with pytest.raises(PolicyError) as refused:
        Policy.load(top)
    assert f" {path} is owned by uid {uid} " in refused.value.message, refused.value
    assert f"with mode {mode:04o} " in refused.value.message, refused.value


@pytest.mark.parametrize(
    ("mode", "owner"), [(0o777, 0), (0o770, 0), (0o1777, 0), (0o755, ATTACKER)]
)
def test_include_directory_another_uid_could_change_is_refused(
    tmp_path: Path, mode: int, owner: int
) -> None:
    top = policy_tree(tmp_path, mode)
    os.chown(tmp_path / "conf.d", owner, owner)
    assert_policy_refused(top, tmp_path / "conf.d", owner, mode)


def test_glob_include_into_an_empty_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    """Nothing matches yet, but anyone may add rules there before the next reload."""
    top = policy_tree(tmp_path, 0o777)
    (tmp_path / "conf.d" / "deny.toml").unlink()
    assert_policy_refused(top, tmp_path / "conf.d", 0, 0o777)


@pytest.mark.parametrize("level", ["parent", "grandparent"])
def test_every_directory_above_the_policy_is_checked(tmp_path: Path, level: str) -> None:
    """As sshd's StrictModes: from / down, not just the file's own directory."""
    top = policy_tree(tmp_path / "etc" / "xsk")
    (tmp_path / "etc").chmod(0o755)
    loose = top.parent if level == "parent" else top.parent.parent
    loose.chmod(0o775)
    assert_policy_refused(top, loose, 0, 0o775)


def test_include_through_a_link_into_a_directory_others_can_write_is_refused(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (shared / "deny.toml").write_text(DENY_ATTACKER)
    top = tmp_path / "policy.toml"
    top.write_text('include = ["deny.toml"]\n' + LAB_POLICY)
    (tmp_path / "deny.toml").symlink_to(shared / "deny.toml")
    assert_policy_refused(top, shared, 0, 0o777)


def test_renaming_a_deny_rule_away_does_not_take_effect_on_reload(
    broker_factory: BrokerFactory,
) -> None:
    """The include directory was safe at start, and then made writable for others (the
    operator's mistake); the attacker renames its deny rule away and waits for a reload."""
    broker, lab = broker_factory(policy=LAB_POLICY)
    assert broker.proc is not None
    policy_tree(broker.policy_path.parent)
    broker.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "policy reloaded" in broker.log())
    ask = actor("ask", json.dumps({"ifname": lab.ifname_a, "queues": 1, "umem_bytes": MIB}))
    env = client_env(broker)

    def attacker_asks() -> dict[str, Any]:
        done = run_unprivileged(ask, ATTACKER, 61000, netns=lab.ns_a, env=env, cwd=str(REPO))
        assert done.returncode == 0, done.stderr
        reply: dict[str, Any] = json.loads(done.stdout)
        return reply

    assert attacker_asks()["code"] == "DENIED"
    conf = broker.policy_path.parent / "conf.d"
    conf.chmod(0o777)
    as_attacker("rename", str(conf / "deny.toml"), str(conf / "deny.toml.off"))
    broker.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "policy reload" in broker.log().split("policy reloaded", 1)[1])
    refused = broker.log().split("policy reloaded", 1)[1]
    assert "policy reload refused" in refused and f"{conf} is owned by uid 0" in refused
    assert attacker_asks()["code"] == "DENIED"
