"""Figures for Prometheus' node_exporter, in its textfile-collector format (docs/operations.md).

The core reports each decision (core.Observer), the front end each refusal before a message
was read and each answer's latency (Timed), the daemon each start; the gauges (leases,
queues, attachments) are read from the live state when the file is written. The file is
rewritten whole and atomically (a temp file made with O_EXCL beside it, fsync, rename), at
most once per WRITE_INTERVAL and only after a change, from the loop after its replies went
out, so no request waits for a write. node_exporter serves the last file also while the
broker is not running (an idle exit): `xsk_broker_up` then says 0.

Counters are per process, as in Prometheus (they restart at zero with the broker, and
`xsk_broker_start_time_seconds` marks each reset), except the starts and adoptions
themselves, which would mean nothing that way: those are kept in the state directory
(/run, so per boot) and carried from one broker to the next.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from broker import trust
from broker.core import NO_OP, Service
from broker.errors import BrokerError, MemlockExceeded, UsageError
from broker.frontend import Answer, FrontEnd, Waiting
from broker.policy import Caller
from broker.protocol import MODES, AttachmentInfo, Granted, LeaseInfo, Reply

log = logging.getLogger("xsk-broker")

# A write of a busy broker's figures (256 leases, 13 KB) costs ~1.4 ms, half of it rendering,
# p99 ~3 ms on a loaded 2-core VM (bench/metrics_write.py); once a second keeps that near
# 0.3 % of the loop even under a flood, and Prometheus scrapes every 15 s or so anyway. The
# hooks on each message cost ~3 us.
WRITE_INTERVAL = 1.0
# Seconds: a ping answers in ~0.1 ms, a many-queue request in tens of ms, polkit in seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PREVIOUS = ("none", "stopped", "died")  # what came before a start
ATTACH_MODES = tuple(mode for mode in MODES if mode != "auto")  # what an attachment can be in
TALLY_NAME = "metrics-tally.json"


def write_atomically(path: Path, data: bytes) -> None:
    """Replace path with data, so readers see the old file or the new one, never a part.

    The temp file is created with O_EXCL|O_NOFOLLOW under a random name, so nothing planted
    in the directory (a symlink, a file) is ever written through, and rename() replaces a
    link at path rather than following it. Mode 0644 whatever the umask: node_exporter
    runs as another user.
    """
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644)
    try:
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_metrics_path(path: Path) -> None:
    """Refuse a metrics file node_exporter would not read (UsageError), or one in a directory
    another uid could write (trust.UntrustedPath): such a uid could not make the broker
    write elsewhere (see write_atomically), but could take the file's name or fake its
    figures. Checked before the broker makes anything; the directory may not exist yet
    when it is the state directory."""
    if path.suffix != ".prom":
        raise UsageError(
            f"--metrics-file {path} does not end in .prom: node_exporter's textfile "
            "collector reads only *.prom files"
        )
    trust.check_new_directory("metrics directory", path.parent)


def _escape(value: str) -> str:
    """A label value as the text format wants it (interface names may hold quotes)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: object) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class Exposition:
    """The text a scrape gets: each family's HELP and TYPE once, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: object) -> None:
        number = repr(value) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{_labels(**labels)} {number}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass
class Histogram:
    """Cumulative buckets as Prometheus counts them: bucket i holds every value <= BUCKETS[i]."""

    counts: list[int]
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


@dataclass
class Tally:
    """Starts and adoptions, carried from broker to broker in the state directory."""

    starts: dict[str, int]
    adopted: dict[str, int]
    running: bool = False

    @classmethod
    def load(cls, path: Path) -> Tally | None:
        """The previous broker's tally; None when there is none (first start this boot)."""
        try:
            body = json.loads(path.read_bytes())
            return cls(
                {k: int(body["starts"].get(k, 0)) for k in PREVIOUS},
                {k: int(body["adopted"].get(k, 0)) for k in ("attachment", "lease")},
                bool(body["running"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("metrics: %s is unreadable (%s); counting starts from zero", path, exc)
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(vars(self)).encode()


class Metrics:
    """What the broker counts, and the file it writes them to (a core.Observer)."""

    def __init__(
        self,
        path: Path,
        state_dir: Path,
        live: Callable[[], tuple[list[AttachmentInfo], list[LeaseInfo]]],
        *,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        check_metrics_path(path)
        trust.check_directory("metrics directory", path.parent)  # now made, if it is ours
        self.path = path
        self.tally_path = state_dir / TALLY_NAME
        self.live = live
        self.clock = clock
        self.started = wallclock()
        self.tally = Tally(dict.fromkeys(PREVIOUS, 0), {"attachment": 0, "lease": 0})
        self.grants: Counter[tuple[str, str]] = Counter()
        self.refusals: Counter[tuple[str, str]] = Counter()
        self.latency: defaultdict[str, Histogram] = defaultdict(
            lambda: Histogram([0] * len(BUCKETS))
        )
        self.shortfalls: dict[int, int] = {}  # consumer uid -> bytes missing, last seen
        self.up = True
        self.last_op = NO_OP
        self.dirty = True
        self.written_at: float | None = None
        self.failing = False

    # --- what is observed ---

    def decided(self, op: str, result: Reply | BrokerError) -> None:
        """The core answered op (core.Observer), or a front end refused before it (NO_OP)."""
        self.last_op = op
        self.dirty = True
        if isinstance(result, Granted):
            self.grants[(result.lease.ifname, result.lease.mode)] += 1
            self.shortfalls.pop(result.lease.consumer_uid, None)
        elif isinstance(result, BrokerError):
            self.refusals[(op, result.code)] += 1
            if isinstance(result, MemlockExceeded) and "limit_bytes" in result.details:
                d = result.details
                missing = d["needed_bytes"] + d["held_bytes"] - d["limit_bytes"]
                self.shortfalls[int(d["uid"])] = int(missing)

    def answered(self, op: str, seconds: float) -> None:
        self.latency[op].observe(seconds)
        self.dirty = True

    def changed(self) -> None:
        """Leases or attachments changed (the core's on_change)."""
        self.dirty = True

    def start(self) -> None:
        """The broker started, and what lives now it adopted from its predecessor: count
        both, and whether the predecessor stopped cleanly (its tally says it was still
        running if it died: SIGKILL, a crash, the OOM killer)."""
        previous = Tally.load(self.tally_path)
        if previous is not None:
            self.tally = previous
        ended = "none" if previous is None else "died" if previous.running else "stopped"
        self.tally.starts[ended] += 1
        attachments, leases = self.live()
        self.tally.adopted["attachment"] += len(attachments)
        self.tally.adopted["lease"] += len(leases)
        self.tally.running = True
        self._save_tally()
        self.write()

    def stop(self) -> None:
        """A clean stop: the file says so (the gauges are as of now), and so does the tally
        (a broker that failed before start() leaves both to its predecessor)."""
        if not self.tally.running:
            return
        self.up = False
        self.tally.running = False
        self._save_tally()
        self.write()

    # --- when to write ---

    def next_timeout(self) -> float | None:
        """Seconds until a pending change may be written; None when nothing is pending."""
        if not self.dirty:
            return None
        if self.written_at is None:
            return 0.0
        return max(0.0, self.written_at + WRITE_INTERVAL - self.clock())

    def flush(self) -> None:
        """Write if something changed and the last write is WRITE_INTERVAL old."""
        if self.next_timeout() == 0.0:
            self.write()

    def write(self) -> None:
        """Write the file now; a failure is logged (once until it works again), never
        raised: metrics must not cost anyone a lease."""
        self.written_at, self.dirty = self.clock(), False
        try:
            write_atomically(self.path, self.render().encode())
        except OSError as exc:
            if not self.failing:
                log.error(
                    "cannot write metrics to %s: %s; make its directory writable by the "
                    "broker (and ReadWritePaths= in a unit drop-in)",
                    self.path,
                    exc,
                )
            self.failing = True
            return
        if self.failing:
            log.info("metrics written to %s again", self.path)
        self.failing = False

    def _save_tally(self) -> None:
        try:
            write_atomically(self.tally_path, self.tally.to_bytes())
        except OSError as exc:
            log.error("cannot keep the start count in %s: %s", self.tally_path, exc)

    # --- the text ---

    def render(self) -> str:
        out = Exposition()
        self._render_process(out)
        self._render_live(out, *self.live())
        self._render_decisions(out)
        return out.text()

    def _render_process(self, out: Exposition) -> None:
        out.family(
            "xsk_broker_up",
            "gauge",
            "1 while the broker runs; 0 after a clean stop (the gauges are as of that stop)",
        )
        out.sample("xsk_broker_up", int(self.up))
        out.family(
            "xsk_broker_start_time_seconds",
            "gauge",
            "when this broker started (unix time); its counters restart at zero then",
        )
        out.sample("xsk_broker_start_time_seconds", round(self.started, 3))
        out.family(
            "xsk_broker_starts_total",
            "counter",
            "broker starts this boot, by how the previous broker ended (none, stopped, died)",
        )
        for previous in PREVIOUS:
            out.sample("xsk_broker_starts_total", self.tally.starts[previous], previous=previous)
        out.family(
            "xsk_broker_adopted_total",
            "counter",
            "attachments and leases a starting broker took over from the previous one, this boot",
        )
        for kind, count in self.tally.adopted.items():
            out.sample("xsk_broker_adopted_total", count, kind=kind)

    def _render_live(
        self, out: Exposition, attachments: Iterable[AttachmentInfo], leases: Iterable[LeaseInfo]
    ) -> None:
        interfaces = {a.ifname: 0 for a in attachments}
        queues = dict(interfaces)
        for lease in leases:
            interfaces[lease.ifname] = interfaces.get(lease.ifname, 0) + 1
            queues[lease.ifname] = queues.get(lease.ifname, 0) + len(lease.queue_ids)
        out.family("xsk_broker_leases", "gauge", "live leases, by interface")
        for ifname in sorted(interfaces):
            out.sample("xsk_broker_leases", interfaces[ifname], interface=ifname)
        out.family("xsk_broker_leased_queues", "gauge", "queues under a live lease, by interface")
        for ifname in sorted(queues):
            out.sample("xsk_broker_leased_queues", queues[ifname], interface=ifname)
        modes = Counter(a.mode for a in attachments)
        out.family(
            "xsk_broker_attachments", "gauge", "interfaces carrying the XSK program, by mode"
        )
        for mode in sorted({*ATTACH_MODES, *modes}):
            out.sample("xsk_broker_attachments", modes[mode], mode=mode)

    def _render_decisions(self, out: Exposition) -> None:
        out.family("xsk_broker_grants_total", "counter", "leases granted, by interface and mode")
        for (ifname, mode), count in sorted(self.grants.items()):
            out.sample("xsk_broker_grants_total", count, interface=ifname, mode=mode)
        out.family(
            "xsk_broker_refusals_total",
            "counter",
            "messages refused, by operation ('none' before one was read) and error code",
        )
        for (op, code), count in sorted(self.refusals.items()):
            out.sample("xsk_broker_refusals_total", count, op=op, code=code)
        name = "xsk_broker_request_duration_seconds"
        out.family(name, "histogram", "from a message's arrival to its answer, by operation")
        for op, histogram in sorted(self.latency.items()):
            for bound, count in zip(BUCKETS, histogram.counts, strict=True):
                out.sample(f"{name}_bucket", count, op=op, le=repr(bound))
            out.sample(f"{name}_bucket", histogram.count, op=op, le="+Inf")
            out.sample(f"{name}_sum", histogram.total, op=op)
            out.sample(f"{name}_count", histogram.count, op=op)
        out.family(
            "xsk_broker_memlock_shortfall_bytes",
            "gauge",
            "locked memory a consumer uid lacked when last refused (until it is granted a lease)",
        )
        for uid, missing in sorted(self.shortfalls.items()):
            out.sample("xsk_broker_memlock_shortfall_bytes", missing, uid=uid)


class Timed:
    """A front end whose answers are timed (from the message's arrival to its answer, polkit
    included) and whose early refusals are counted; the operation label is the one the core
    decided during the call (Metrics.decided), NO_OP when no message was read."""

    def __init__(self, inner: FrontEnd, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def refuse(self, error: BrokerError) -> Answer:
        self.metrics.decided(NO_OP, error)
        return self.inner.refuse(error)

    def handle(self, caller: Caller, data: bytes) -> Answer | Waiting:
        started = time.perf_counter()
        answer = self._timed(started, lambda: self.inner.handle(caller, data))
        if isinstance(answer, Answer):
            return answer

        def finish(verdict: BaseException | None) -> Answer:
            done = self._timed(started, lambda: answer.finish(verdict))
            assert isinstance(done, Answer)
            return done

        return Waiting(answer.check, finish)

    def _timed(self, started: float, step: Callable[[], Answer | Waiting]) -> Answer | Waiting:
        self.metrics.last_op = NO_OP
        answer = step()
        if isinstance(answer, Answer):
            self.metrics.answered(self.metrics.last_op, time.perf_counter() - started)
        return answer


def instrument(
    service: Service, front: FrontEnd, path: Path, state_dir: Path
) -> tuple[Metrics, FrontEnd]:
    """Metrics fed by service and by front, which is returned timed."""

    def live() -> tuple[list[AttachmentInfo], list[LeaseInfo]]:
        """Every attachment and every live lease (status() lists only so many leases)."""
        attachments = [a.describe() for a in service.loader.attachments.values()]
        return attachments, [lease.info for lease in service.leases.by_id.values()]

    metrics = Metrics(path, state_dir, live)
    report = service.on_change

    def on_change(line: str) -> None:
        report(line)
        metrics.changed()

    service.observer, service.on_change = metrics, on_change
    return metrics, Timed(front, metrics)
