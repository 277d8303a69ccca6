"""`xsk-broker serve`: the order of start-up matters, so it is written down once here.

1. logging (journal or stderr), 2. bpffs and 3. the listening socket (from systemd, or bound
by hand: mounting and chgrp need privileges the broker is about to drop), 4. capabilities
down to the three it needs, 5. adopt pins and leases, 6. READY=1, serve.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from broker import activation, caps
from broker.limits import raise_fd_limit
from broker.loader import DEFAULT_PIN_ROOT, ensure_bpffs
from broker.policy import DEFAULT_POLICY_PATH
from broker.protocol import socket_path_from
from broker.server import FDSTORE_PREFIX, Broker, ServeConfig

log = logging.getLogger("xsk-broker")


def config_from(opts: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        socket_path=Path(socket_path_from(opts.socket)),
        pin_root=opts.pin_dir or DEFAULT_PIN_ROOT,
        state_dir=opts.state_dir or ServeConfig.state_dir,
        idle_exit=opts.idle_exit,
        max_connections=opts.max_connections,
        max_connections_per_uid=opts.max_connections_per_uid,
        rate_per_uid=opts.rate_per_uid,
        burst_per_uid=2 * opts.rate_per_uid,
        policy_path=opts.policy or DEFAULT_POLICY_PATH,
    )


def _earliest(*timeouts: float | None) -> float | None:
    known = [t for t in timeouts if t is not None]
    return min(known) if known else None


def main(opts: argparse.Namespace) -> int:
    activation.setup_logging(opts.verbose)
    config = config_from(opts)
    ensure_bpffs(config.pin_root)
    raise_fd_limit()
    group = int(opts.group) if opts.group and opts.group.isdigit() else opts.group
    inherited = activation.inherited_fds()
    listener = activation.listening_socket(config.socket_path, group=group, inherited=inherited)
    caps.enter_least_privilege(opts.allow_root)
    notifier = activation.Notifier()
    stored = {name: fd for name, fd in inherited if name.startswith(FDSTORE_PREFIX)}
    broker = Broker(config, listener, notifier=notifier, stored_fds=stored)

    broker.catch_signals()
    try:
        broker.start()
        notifier.ready()
        log.info("serving on %s", config.socket_path)
        while broker.running:
            broker.step(_earliest(broker.next_timeout(), notifier.watchdog_interval))
            notifier.watchdog()
            if broker.idle_expired():
                log.info("idle for %.0f s: exiting", config.idle_exit)
                break
    finally:
        notifier.stopping()
        broker.close()
    return 0
