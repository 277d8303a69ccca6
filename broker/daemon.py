"""`xsk-broker serve`: the order of start-up matters, so it is written down once here.

1. logging (journal or stderr), 2. every refusal that can be decided up front (root without
--allow-root, missing capabilities, an unknown group, a directory another uid could change
(broker.trust), a bad policy), so a refused start creates nothing, 3. the listening socket
(from systemd, or bound by hand) and 4. bpffs (chgrp and mounting need privileges the
broker is about to drop), 5. capabilities down to the three it needs, 6. adopt pins and
leases, 7. READY=1, serve. A start that fails after 3 removes what it made: the socket it
bound, the pin and state directories it created.
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
from broker.config import ServeConfig
from broker.core import FDSTORE_PREFIX, Service
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
    with undone_on_failure(listener, bound, config.pin_root, config.state_dir):
        ensure_bpffs(config.pin_root)
        if config.map_pins:
            check_lease_pin_dir(config.pin_root)
        caps.enter_least_privilege(config.allow_root, keep)
        trust.ensure_directory("state directory", config.state_dir, 0o755)
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
    return 0
