"""Client text with every character that could forge, split or colour a line, logged through
audit.setup_logging() as the broker logs it (to the journal when run under systemd): an audit
event (message and fields), a %-formatted line and an exception's message."""

import logging

from broker import audit

HOSTILE = "x\n1999-01-01 FORGED\r\x1b[2J\x00\u202e\ud800\u2028y"

audit.setup_logging()
log = logging.getLogger("xsk-broker")
audit.log_event(log, f"denied {HOSTILE}", interface="xskt-hostile", tag=HOSTILE)
log.info("refused %s", HOSTILE)
try:
    raise ValueError(HOSTILE)
except ValueError:
    log.exception("internal error")
