"""One audit event through audit.setup_logging(), as the broker logs it (to the journal
when run under systemd)."""

import logging

from broker import audit

audit.setup_logging()
audit.log_event(
    logging.getLogger("xsk-broker"),
    "granted",
    interface="xskt-a",
    queues=[0, 1],
    uid=1000,
    lease="L1",
)
