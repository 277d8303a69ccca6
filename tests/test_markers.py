"""The conftest rule that a test using a lab or broker fixture must be marked kernel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, run_captured

TESTS = REPO / "tests"

UNMARKED = """
from lab.brokerproc import BrokerEnv

def test_pure() -> None:
    assert True

def test_forgot_the_mark(broker: BrokerEnv) -> None:
    assert broker.socket_path
"""


def collect(tmp_path: Path, module: str) -> subprocess.CompletedProcess[str]:
    """Collect one module beside a copy of this suite's conftest.py (nothing runs)."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(module)
    return run_captured(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, timeout=60,
    )  # fmt: skip


def test_an_unmarked_test_using_a_broker_fixture_fails_collection(tmp_path: Path) -> None:
    done = collect(tmp_path, UNMARKED)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "not marked kernel" in done.stderr
    assert "test_probe.py::test_forgot_the_mark (uses bpf_root, broker)" in done.stderr
    assert "test_pure" not in done.stderr


@pytest.mark.parametrize(
    "mark",
    ["import pytest\npytestmark = pytest.mark.kernel\n", "import pytest\n@pytest.mark.kernel"],
    ids=["module", "test"],
)
def test_the_mark_on_module_or_test_satisfies_it(tmp_path: Path, mark: str) -> None:
    module = UNMARKED.replace("def test_forgot_the_mark", mark + "\ndef test_forgot_the_mark")
    done = collect(tmp_path, module)
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "2 tests collected" in done.stdout


def test_the_suites_root_tests_are_marked() -> None:
    """What collecting without the kernel tests leaves: none of the modules that need root,
    and none of test_aio's tests that ask the session's broker."""
    result = run_captured(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not kernel",
         "-p", "no:cacheprovider", str(TESTS)],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    left = [line for line in result.stdout.splitlines() if "::" in line]
    assert any(line.startswith("tests/test_protocol.py::") for line in left), left
    for module in ("test_qmp", "test_examples", "test_memlock", "test_polkit", "test_consumer"):
        assert not [line for line in left if line.startswith(f"tests/{module}.py::")], module
    aio = {line.split("::")[1] for line in left if line.startswith("tests/test_aio.py::")}
    assert aio == {
        "test_unreachable_names_path_and_errno",
        "test_socket_path_comes_from_the_environment",
        "test_silent_peer_times_out",
        "test_peer_closing_without_reply_is_a_protocol_violation",
    }
