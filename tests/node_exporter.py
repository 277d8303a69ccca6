"""Debian 12's own node_exporter, run by hand for the metrics tests.

scripts/node-exporter.sh unpacks the bookworm package into the lab cache (never installs
it: that would start a service on the host's port 9100). A test runs the binary as an
unprivileged uid with only the textfile collector, on a free loopback port, and scrapes
/metrics over HTTP as Prometheus would.
"""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from support import REPO, Spawn, piped, wait_until

from lab import cache as labcache
from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID

SCRIPT = REPO / "scripts" / "node-exporter.sh"
# name{label="value",...} value; label values may hold escaped quotes
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


def ensure_binary() -> Path:
    path = labcache.entry("node-exporter", SCRIPT.read_bytes())
    labcache.ensure(path, lambda dest: ["sh", str(SCRIPT), str(dest)], timeout=300)
    return path / "root" / "usr" / "bin" / "prometheus-node-exporter"


def parse(text: str) -> Figures:
    """Every sample of a text exposition, by name and labels."""
    figures: Figures = {}
    for line in text.splitlines():
        found = SAMPLE.match(line)
        if found and not line.startswith("#"):
            name, labels, value = found.groups()
            pairs = frozenset(LABEL.findall(labels or ""))
            figures[(name, pairs)] = float(value)
    return figures


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def free_port() -> int:
    """A loopback port nobody listens on now (the exporter is retried should one take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NodeExporter:
    """One node_exporter process reading textfile_dir, as uid UNPRIVILEGED_UID."""

    def __init__(self, spawn: Spawn, textfile_dir: Path) -> None:
        binary = ensure_binary()
        for _ in range(5):
            self.url = f"http://127.0.0.1:{free_port()}/metrics"
            self.proc = spawn(
                [str(binary), "--collector.disable-defaults", "--collector.textfile",
                 f"--collector.textfile.directory={textfile_dir}",
                 f"--web.listen-address={self.url.split('/')[2]}",
                 "--web.disable-exporter-metrics", "--log.level=warn"],
                user=UNPRIVILEGED_UID, group=UNPRIVILEGED_GID, extra_groups=[],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            answered = wait_until(self._answers, timeout=60, fail=False)
            if self.proc.poll() is None:  # running: it answers, or something is wrong
                assert answered, f"node_exporter runs but did not answer {self.url} in 60 s"
                return
        raise AssertionError(f"node_exporter did not start: {piped(self.proc.stderr).read()!r}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            return True  # exited (the port was taken?): no use waiting
        try:
            urllib.request.urlopen(self.url, timeout=2).close()
        except (urllib.error.URLError, OSError):
            return False
        return True

    def scrape(self) -> Figures:
        with urllib.request.urlopen(self.url, timeout=5) as reply:
            return parse(reply.read().decode())

    def scrape_until(self, wanted: Callable[[Figures], bool], timeout: float = 30) -> Figures:
        """The first scrape for which wanted() holds (the broker writes within a second)."""
        seen: list[Figures] = [{}]

        def ok() -> bool:
            seen[0] = self.scrape()
            return wanted(seen[0])

        if not wait_until(ok, timeout, fail=False):
            text = "\n".join(f"{k[0]}{dict(k[1])} {v}" for k, v in sorted(seen[0].items()))
            raise AssertionError(f"node_exporter never served the figures; last scrape:\n{text}")
        return seen[0]
