"""`xsk-broker serve`: the order of start-up matters, so it is written down once here.

1. logging (journal or stderr), 2. every refusal that can be decided up front (root without
--allow-root, missing capabilities, an unknown group, a directory another uid could change
(broker.trust), a bad policy, a directory another broker holds (broker.dirlock)), so a
refused start creates nothing, 3. the listening socket (from systemd, or bound by hand) and
4. bpffs (chgrp and mounting need privileges the broker is about to drop), 5. capabilities
down to the three it needs, 6. the directories' locks, 7. adopt pins and leases, 8. READY=1,
serve. A start that fails after 3 removes what it made: the socket it bound, the pin and
state directories it created and their lock entries.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from broker import activation, audit, caps, trust
from broker.bpffs import check_lease_pin_dir, ensure_bpffs, lease_pin_dir
from broker.config import ServeConfig, flag_of
from broker.core import FDSTORE_PREFIX, Service
from broker.dirlock import LOCK_NAME, DirectoryLocks
from broker.frontend import FrontEnd
from broker.jsonfront import JsonFrontEnd
from broker.leases import LeaseTable
from broker.limits import raise_fd_limit
from broker.loader import Loader
from broker.maplease import MapLeases
from broker.server import PidfdWatch, Server

if TYPE_CHECKING:
    from broker.metrics import Metrics

log = logging.getLogger("xsk-broker")


def _earliest(*timeouts: float | None) -> float | None:
    known = [t for t in timeouts if t is not None]
    return min(known) if known else None


def refuse_untrusted(config: ServeConfig, activated: bool) -> None:
    """Refuse a directory another uid could change before anything is mounted, bound or
    created, so that the refusal leaves nothing behind (each is checked again as it is
    made)."""
    trust.check_new_directory("state directory", config.state_dir)
    trust.check_new_directory("pin directory", config.pin_root)
    if not activated:
        trust.check_new_directory("socket directory", config.socket_path.parent)
    if config.metrics_file is not None:
        from broker.metrics import check_metrics_path

        check_metrics_path(config.metrics_file)


def lock_directories(config: ServeConfig, locks: DirectoryLocks, *, create: bool) -> None:
    """Hold the state directory's and the pin directories' locks (broker.dirlock): first
    with create False, before the socket is bound, for the entries that exist (a second
    broker is refused having made nothing); then, once the directories exist, all. The map
    leases' pin directory is made now under --map-pins, so the lock is held from the start;
    one another uid could change is left alone (its first pin refuses it, maplease.py)."""
    pins = flag_of("pin_root")
    locks.take("state directory", flag_of("state_dir"), config.state_dir, create=create)
    locks.take("pin directory", pins, config.pin_root, create=create)
    leases = lease_pin_dir(config.pin_root)
    with contextlib.suppress(trust.UntrustedPath):
        if create and config.map_pins:
            trust.ensure_directory("lease pin directory", leases, 0o711)
        trust.check_directory("lease pin directory", leases)
        locks.take("lease pin directory", pins, leases, create=create)


def device_plugin_front_end(service: Service, lease_id: str) -> FrontEnd:
    """A map lease's front end; dpfront is imported with the first one, not by every start
    (most first replies hand out sockets)."""
    from broker.dpfront import DevicePluginFrontEnd

    return DevicePluginFrontEnd(service, lease_id)


@contextlib.contextmanager
def undone_on_failure(listener: socket.socket, bound: Path | None, *dirs: Path) -> Iterator[None]:
    """Undo the start's traces if the body fails: the socket file bound here (not one
    systemd owns), and whichever of dirs did not exist before (if still empty)."""
    made = [path for path in dirs if not path.exists()]
    try:
        yield
    except BaseException:
        listener.close()
        if bound is not None:
            with contextlib.suppress(OSError):
                bound.unlink()
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def main(config: ServeConfig) -> int:
    audit.setup_logging(config.verbose)
    keep = caps.REQUIRED + caps.OPTIONAL + (caps.MAP_PINS if config.map_pins else ())
    caps.check_start(config.allow_root, keep)
    group = None
    if config.group is not None:
        group = activation.gid_of(int(config.group) if config.group.isdigit() else config.group)
    inherited = activation.inherited_fds()
    refuse_untrusted(config, activated=bool(inherited))
    locks = DirectoryLocks()  # held until the process exits, whichever way
    lock_directories(config, locks, create=False)
    selector = selectors.DefaultSelector()
    notifier = activation.Notifier()
    service = Service(
        config.policy_path,
        Loader(config.pin_root),
        LeaseTable(config.state_dir),
        PidfdWatch(selector),
        notifier,
        max_status_leases=config.max_status_leases,
        on_change=notifier.status,
    )
    raise_fd_limit()
    listener = activation.listening_socket(config.socket_path, group=group, inherited=inherited)
    bound = None if any(fd == listener.fileno() for _, fd in inherited) else config.socket_path
    made = (config.pin_root, config.state_dir, lease_pin_dir(config.pin_root))
    with undone_on_failure(listener, bound, *made, *(path / LOCK_NAME for path in made)):
        ensure_bpffs(config.pin_root)
        if config.map_pins:
            check_lease_pin_dir(config.pin_root)
        caps.enter_least_privilege(config.allow_root, keep)
        trust.ensure_directory("state directory", config.state_dir, 0o755)
        lock_directories(config, locks, create=True)
        stored = {name: fd for name, fd in inherited if name.startswith(FDSTORE_PREFIX)}
        front: FrontEnd = JsonFrontEnd(service)
        metrics: Metrics | None = None
        if config.metrics_file is not None:  # imported only then: a cold start waits for imports
            from broker.metrics import instrument

            metrics, front = instrument(service, front, config.metrics_file, config.state_dir)
        server = Server(config, listener, front, service, selector)
        service.maps = MapLeases(
            dp_dir=config.state_dir / "dp",
            pin_dir=lease_pin_dir(config.pin_root),
            serve=server.serve,
            unserve=server.unserve,
            front_end=lambda lease_id: device_plugin_front_end(service, lease_id),
        )
        server.catch_signals()
        try:
            service.start(stored)
        except BaseException:
            server.close()
            service.close()
            raise
    try:
        if metrics is not None:
            metrics.start()
        notifier.ready()
        log.info("serving on %s", config.socket_path)
        while server.running:
            waits = [server.next_timeout(), notifier.watchdog_interval]
            server.step(_earliest(*waits, metrics.next_timeout() if metrics else None))
            if metrics is not None:
                metrics.flush()
            notifier.watchdog()
            if server.idle_expired():
                log.info("idle for %.0f s: exiting", config.idle_exit)
                break
    finally:
        notifier.stopping()
        server.close()
        if metrics is not None and sys.exc_info()[0] is None:  # a crash is counted as died
            metrics.stop()
        service.close()
        locks.close()  # last: a next broker may start once all of this one is closed
    return 0
