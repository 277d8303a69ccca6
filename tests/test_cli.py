"""The command-line contract launch scripts rely on: exit codes, one-line coded errors."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
from pathlib import Path

import pytest
from support import xsk_cli as xsk

from broker import config, version
from lab.brokerproc import BrokerProcess
from xsk_broker.cli import build_parser


def test_version_comes_from_the_package_metadata() -> None:
    result = xsk("--version")
    assert result.returncode == 0
    assert result.stdout == f"xsk-broker {importlib.metadata.version('xsk-broker')}\n"


def test_attach_remains_an_alias_of_attach_nic() -> None:
    parser = build_parser()
    old = parser.parse_args(
        ["attach", "--qmp", "q", "--id", "n1", "--ifname", "e", "--queues", "1"]
    )
    new = parser.parse_args(
        ["attach-nic", "--qmp", "q", "--id", "n1", "--ifname", "e", "--queues", "1"]
    )
    assert old.func is new.func and vars(old) | {"cmd": None} == vars(new) | {"cmd": None}


def test_serve_flags_are_the_config_table() -> None:
    """Every ServeConfig field is a serve flag, and unset flags keep the table's defaults."""
    parser = build_parser()
    opts = parser.parse_args(["serve", "--max-status-leases", "7", "--allow-root", "-v"])
    built = config.from_flags(opts)
    assert (built.max_status_leases, built.allow_root, built.verbose) == (7, True, True)
    assert dataclasses.replace(
        built, max_status_leases=200, allow_root=False, verbose=False
    ) == config.ServeConfig(socket_path=built.socket_path)
    usage = xsk("serve", "--help").stdout
    for field in dataclasses.fields(config.ServeConfig):
        assert config.flag_of(field.name) in usage, field.name
    assert "--socket PATH" in usage and "--state-dir PATH" in usage
    assert "POSIXPATH" not in usage


def test_usage_error_is_one_coded_line_with_exit_2() -> None:
    result = xsk("request", "--queues", "2")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("USAGE: ")


@pytest.mark.parametrize("command", [["ping"], ["status", "--json"], ["detach", "--ifname", "x"]])
def test_unreachable_broker_is_one_coded_line_with_exit_1(
    tmp_path: Path, command: list[str]
) -> None:
    result = xsk(*command, "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"BROKER_UNREACHABLE: cannot connect to the broker at {tmp_path}"
    )


def test_every_broker_command_takes_socket_and_reporting_ones_take_json() -> None:
    subcommands = next(
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    options = {
        name: {opt for action in parser._actions for opt in action.option_strings}
        for name, parser in subcommands.items()
    }
    assert {name for name, opts in options.items() if "--socket" not in opts} == {
        "policy",  # reads a file, asks no broker
        "install-units",
        "demo",  # starts its own broker
    }
    assert {name for name, opts in options.items() if "--json" not in opts} == {
        "serve",
        "request",  # becomes COMMAND
        "policy",  # `policy check` prints text only so far
        "libvirt-watch",  # a daemon: one log line per NIC, for the journal
    }


@pytest.mark.parametrize("command", ["probe", "attach"])
def test_umem_bytes_is_refused_where_it_would_be_ignored(command: str) -> None:
    """probe registers its own UMEM and attach's consumer is QEMU: the flag is request's."""
    result = xsk(command, "--ifname", "x", "--queues", "1", "--umem-bytes", "4096")
    assert result.returncode == 2 and result.stderr.startswith("USAGE: ")


def test_socket_comes_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "XSK_BROKER_SOCKET": str(tmp_path / "env.sock")}
    result = xsk("ping", env=env)
    assert result.returncode == 1 and "env.sock" in result.stderr


@pytest.mark.kernel
def test_status_json_and_request_without_command(broker4: BrokerProcess) -> None:
    status = xsk("status", "--json", "--socket", str(broker4.socket_path))
    assert status.returncode == 0
    assert set(json.loads(status.stdout)) == {
        "broker", "attachments", "leases", "lease_count", "leases_filtered", "leases_trimmed"
    }  # fmt: skip
    missing = xsk(
        "request", "--ifname", "lo", "--queues", "1", "--socket", str(broker4.socket_path)
    )
    assert missing.returncode == 2 and missing.stderr.startswith("USAGE: give the command")


def test_install_units_points_execstart_at_the_given_path(tmp_path: Path) -> None:
    result = xsk("install-units", "--prefix", str(tmp_path), "--exec-path", "/opt/x/xsk-broker",
                 "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    installed = json.loads(result.stdout)["installed"]
    service = tmp_path / "usr/lib/systemd/system/xsk-broker.service"
    assert str(service) in installed
    assert "ExecStart=/opt/x/xsk-broker serve" in service.read_text()


def test_version_says_so_when_the_package_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkout run without `pip install` has no metadata: ping and --version still work."""

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version.broker_version.__wrapped__() == version.UNKNOWN
