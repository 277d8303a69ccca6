"""`xsk-broker serve`: the order of start-up matters, so it is written down once here.

1. logging (journal or stderr), 2. bpffs and 3. the listening socket (from systemd, or bound
by hand: mounting and chgrp need privileges the broker is about to drop), 4. capabilities
down to the three it needs, 5. adopt pins and leases, 6. READY=1, serve.
"""

from __future__ import annotations

import logging
import selectors
from typing import TYPE_CHECKING

from broker import activation, audit, caps
from broker.bpffs import ensure_bpffs
from broker.config import ServeConfig
from broker.core import FDSTORE_PREFIX, Service
from broker.frontend import FrontEnd
from broker.jsonfront import JsonFrontEnd
from broker.leases import LeaseTable
from broker.limits import raise_fd_limit
from broker.loader import Loader
from broker.server import PidfdWatch, Server

if TYPE_CHECKING:
    from broker.metrics import Metrics

log = logging.getLogger("xsk-broker")


def _earliest(*timeouts: float | None) -> float | None:
    known = [t for t in timeouts if t is not None]
    return min(known) if known else None


def main(config: ServeConfig) -> int:
    audit.setup_logging(config.verbose)
    ensure_bpffs(config.pin_root)
    raise_fd_limit()
    group = int(config.group) if config.group and config.group.isdigit() else config.group
    inherited = activation.inherited_fds()
    listener = activation.listening_socket(config.socket_path, group=group, inherited=inherited)
    caps.enter_least_privilege(config.allow_root)
    notifier = activation.Notifier()
    stored = {name: fd for name, fd in inherited if name.startswith(FDSTORE_PREFIX)}
    config.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
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
        if metrics is not None:
            metrics.stop()
        service.close()
    return 0
