"""`xsk-broker serve`: the order of start-up matters, so it is written down once here.

1. logging (journal or stderr), 2. the directories it will trust checked (broker.trust),
before anything is made, 3. bpffs and 4. the listening socket (from systemd, or bound by
hand: mounting and chgrp need privileges the broker is about to drop), 5. capabilities down
to the three it needs, 6. adopt pins and leases, 7. READY=1, serve.
"""

from __future__ import annotations

import logging
import selectors
import sys
from typing import TYPE_CHECKING

from broker import activation, audit, caps, trust
from broker.bpffs import ensure_bpffs
from broker.config import ServeConfig
from broker.core import FDSTORE_PREFIX, Service
from broker.dpfront import DevicePluginFrontEnd
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


def main(config: ServeConfig) -> int:
    audit.setup_logging(config.verbose)
    inherited = activation.inherited_fds()
    refuse_untrusted(config, activated=bool(inherited))
    ensure_bpffs(config.pin_root)
    raise_fd_limit()
    group = int(config.group) if config.group and config.group.isdigit() else config.group
    listener = activation.listening_socket(config.socket_path, group=group, inherited=inherited)
    keep = caps.REQUIRED + caps.OPTIONAL + (caps.MAP_PINS if config.map_pins else ())
    caps.enter_least_privilege(config.allow_root, keep)
    notifier = activation.Notifier()
    stored = {name: fd for name, fd in inherited if name.startswith(FDSTORE_PREFIX)}
    trust.ensure_directory("state directory", config.state_dir, 0o755)
    selector = selectors.DefaultSelector()
    service = Service(
        config.policy_path,
        Loader(config.pin_root),
        LeaseTable(config.state_dir),
        PidfdWatch(selector),
        notifier,
        max_status_leases=config.max_status_leases,
        on_change=notifier.status,
    )
    front: FrontEnd = JsonFrontEnd(service)
    metrics: Metrics | None = None
    if config.metrics_file is not None:  # imported only then: a cold start waits for imports
        from broker.metrics import instrument

        metrics, front = instrument(service, front, config.metrics_file, config.state_dir)
    server = Server(config, listener, front, service, selector)
    service.maps = MapLeases(
        dp_dir=config.state_dir / "dp",
        pin_dir=config.pin_root.with_name(config.pin_root.name + "-leases"),
        serve=server.serve,
        unserve=server.unserve,
        front_end=lambda lease_id: DevicePluginFrontEnd(service, lease_id),
    )
    server.catch_signals()
    try:
        service.start(stored)
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
