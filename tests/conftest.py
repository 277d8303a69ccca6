"""Shared fixtures, and the CI rule that a skipped kernel test is a failed one.

A test that needs root (namespaces, veths, bpf, AF_XDP, other uids) is marked `kernel`,
on its module (`pytestmark = pytest.mark.kernel`) or on itself. Without root, and without
XSKT_STRICT, those are skipped. XSKT_STRICT=1 (set by .ci/run) turns every skip into a
failure; XSKT_REPORT=FILE receives how many kernel tests, and of those how many real-QEMU
tests, passed, so CI can prove that the kernel suite really ran.

Collection fails if a test uses a lab or broker fixture (bpf_root, or one that yields a
VethLab, BrokerProcess, BrokerEnv or BootedContainer) without the mark: such a test would
otherwise run unmarked, uncounted, and fail rather than skip for a non-root developer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from lab.brokerproc import BrokerEnv, BrokerProcess, public_tempdir, wait_until
from lab.netlab import VethLab, bpffs

STRICT = os.environ.get("XSKT_STRICT") == "1"
_passed = {"kernel": 0, "qemu": 0}


# Fixtures that need root whatever they return, and the types a kernel fixture yields.
KERNEL_FIXTURES = frozenset({"bpf_root"})
KERNEL_TYPES = ("VethLab", "BrokerProcess", "BrokerEnv", "BootedContainer")


def kernel_fixtures(item: pytest.Item) -> list[str]:
    """The fixtures item uses (directly or through others) that need the kernel suite."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    found = []
    for name, definitions in info.name2fixturedefs.items():
        for definition in definitions:
            returns = str(getattr(definition.func, "__annotations__", {}).get("return", ""))
            if name in KERNEL_FIXTURES or any(kind in returns for kind in KERNEL_TYPES):
                found.append(name)
                break
    return sorted(found)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [
        f"  {item.nodeid} (uses {', '.join(names)})"
        for item in items
        if "kernel" not in item.keywords and (names := kernel_fixtures(item))
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use lab or broker fixtures but are not marked kernel "
            "(add pytestmark = pytest.mark.kernel or @pytest.mark.kernel):\n" + "\n".join(unmarked)
        )
    if os.geteuid() != 0 and not STRICT:
        skip = pytest.mark.skip(reason="kernel tests need root (CI runs them as root)")
        for item in items:
            if "kernel" in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and STRICT:
        report.outcome = "failed"
        report.longrepr = f"skipped under XSKT_STRICT=1 (CI): {report.longrepr}"
    if report.when == "call" and report.passed:
        for marker in _passed:
            _passed[marker] += marker in item.keywords


# Every process this run starts inherits the mark, unless given an environment of its own
# (the unprivileged ones are: they are checked by the tests that start them). Random, not
# the run's pid: a pid is reused, so a killed run's leftovers (or those of a run in another
# pid namespace) could carry the pid of a later run, which would kill them and fail.
SESSION_VARIABLE = "XSKT_TEST_SESSION"
os.environ[SESSION_VARIABLE] = os.urandom(8).hex()


def _marked(pid: int, mark: bytes) -> str | None:
    """pid's command line if its environment carries mark; None if not, or if it is gone."""
    with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
        if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            return argv.decode(errors="replace").strip()
    return None


def _mark(session: str | None) -> bytes:
    return f"{SESSION_VARIABLE}={session or os.environ[SESSION_VARIABLE]}".encode()


def left_running(session: str | None = None) -> dict[int, str]:
    """Processes carrying this run's mark (or session's) in their environment: a broker,
    consumer or tracer some test started and never stopped. {pid: command line}"""
    mark = _mark(session)
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            argv = _marked(int(entry.name), mark)
            if argv is not None:
                found[int(entry.name)] = argv
    return found


def kill_left_running(pids: Iterable[int], session: str | None = None) -> dict[int, str]:
    """SIGKILL those of pids that still carry the run's mark; returns them. Through a pidfd
    opened before the mark is checked: a listed process that exits meanwhile may leave its
    pid to anyone's process (the machine is shared, and this runs as root), which a kill by
    pid would hit; a signal through the pidfd then fails instead (ESRCH)."""
    mark, killed = _mark(session), {}
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if (argv := _marked(pid, mark)) is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed[pid] = argv
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    return killed


@pytest.hookimpl(trylast=True)  # after the runner has torn down session fixtures
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A process a test left running fails the run (after a grace period in which it may
    still be stopping) and is killed, so the machine is left clean."""
    if os.geteuid() == 0:
        wait_until(lambda: not left_running(), 10, fail=False)
        if leftovers := kill_left_running(left_running()):
            listed = "\n".join(f"  {pid}: {argv}" for pid, argv in leftovers.items())
            print(f"\nprocesses left running by the tests (now killed):\n{listed}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    target = os.environ.get("XSKT_REPORT")
    if target:
        Path(target).write_text(json.dumps({f"{k}_passed": n for k, n in _passed.items()}))


@pytest.fixture(scope="session")
def bpf_root() -> Iterator[Path]:
    """A private bpffs for the whole run; the host's /sys/fs/bpf is never touched."""
    with bpffs() as path:
        yield path


@pytest.fixture
def pin_root(bpf_root: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = bpf_root / request.node.name[:40].replace("[", "_").replace("]", "")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start children (`sleep 600` unless told otherwise, with Popen's keyword arguments);
    all are killed and reaped after the test."""
    children: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str] | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(argv or ["sleep", "600"], **kwargs)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = public_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def veth_lab_fixture(queues: int) -> object:
    """A fixture, named by the module-level name it is bound to: a fresh veth lab with
    `queues` queues, removed after the test (lab4 here; test modules make other sizes)."""

    def lab() -> Iterator[VethLab]:
        with VethLab(queues=queues) as lab:
            yield lab

    return pytest.fixture(lab)


def broker_fixture(lab: str, *serve: str) -> object:
    """A fixture, named like veth_lab_fixture's: a broker with `serve` options on the `a` end
    of the lab that fixture `lab` makes, stopped after the test. It asks for its fixtures in
    the order a plain fixture's arguments would (lab, pin_root, workdir), so they are set up
    in that order and torn down in the reverse, the broker first."""

    def broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
        veth, pins, workdir = map(request.getfixturevalue, (lab, "pin_root", "workdir"))
        with BrokerProcess(veth.ns_a, pins, workdir, *serve) as proc:
            yield proc

    return pytest.fixture(broker)


lab4 = veth_lab_fixture(queues=4)
broker4 = broker_fixture("lab4")  # serving the `a` end of a fresh 4-queue veth lab


@pytest.fixture
def broker_factory(
    lab4: VethLab, pin_root: Path, workdir: Path
) -> Iterator[Callable[..., tuple[BrokerProcess, VethLab]]]:
    """Start a broker on lab4 with extra `serve` options (and BrokerProcess options such as
    policy= or env=); stopped at the end."""
    started: list[BrokerProcess] = []

    def start(*extra: str, **options: Any) -> tuple[BrokerProcess, VethLab]:
        started.append(BrokerProcess(lab4.ns_a, pin_root, workdir, *extra, **options).start())
        return started[-1], lab4

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture(scope="session")
def broker(bpf_root: Path) -> Iterator[BrokerEnv]:
    """One broker on a 64-queue veth for the whole session (tests use distinct queues)."""
    workdir = public_tempdir()
    try:
        with (
            VethLab(queues=64) as lab,
            BrokerProcess(lab.ns_a, bpf_root / "shared", workdir) as proc,
        ):
            yield BrokerEnv(str(proc.socket_path), lab.ifname_a, lab.ns_a, proc.log_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
