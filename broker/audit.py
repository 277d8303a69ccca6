"""Where the broker's lines go: the journal with structured fields under journald, else
stderr with key=value fields; the one function every audit line goes through; and the one
place where every record is made printable (client text must not forge or colour lines)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from types import TracebackType

from broker.errors import printable

SYSLOG_IDENTIFIER = "xsk-broker"
log = logging.getLogger(SYSLOG_IDENTIFIER)


# The record attribute holding an event's fields as key=value text. Lower-case, so the
# journal, which takes upper-case record attributes as fields, leaves it out.
_FIELDS_TEXT = "xsk_fields_text"


def queue_span(queue_ids: list[int]) -> str:
    """Consecutive queue ids (every lease's and request's are) as "first-last" from three
    on, so that a 253-queue refusal's line names a span, not 253 numbers."""
    if len(queue_ids) >= 3 and queue_ids == list(range(queue_ids[0], queue_ids[-1] + 1)):
        return f"{queue_ids[0]}-{queue_ids[-1]}"
    return ",".join(map(str, queue_ids))


def _field_value(value: object) -> str:
    if isinstance(value, list | tuple):
        numbers = [v for v in value if isinstance(v, int)]
        return queue_span(numbers) if len(numbers) == len(value) else ",".join(map(str, value))
    return str(value)


def _pair(key: str, value: str) -> str:
    return f"{key}={value!r}" if " " in value else f"{key}={value}"


class _StderrFormatter(logging.Formatter):
    """Message followed by the event's fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields: str = getattr(record, _FIELDS_TEXT, "")
        return f"{text} {fields}" if fields else text


class _Printable(logging.Filter):
    """Escapes what a record carries before any handler writes it: the message with its
    arguments, the event's fields (journal fields and key=value text) and an exception's
    message, so that whatever text a client put anywhere stays on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(record.getMessage()), ()
        for key, value in vars(record).items():
            if (key.isupper() or key == _FIELDS_TEXT) and isinstance(value, str):
                setattr(record, key, printable(value))
        if record.exc_info and record.exc_text is None:
            record.exc_text = _exception_text(record.exc_info)
        return True


_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exception_text(exc_info: _ExcInfo | tuple[None, None, None]) -> str:
    """The traceback of the broker's own code, and the exception's message escaped (chained
    exceptions are left out: their messages, too, may quote a client)."""
    kind, exc, tb = exc_info
    if kind is None:
        return ""
    only = "".join(traceback.format_exception_only(kind, exc)).rstrip("\n")
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{printable(only)}"


def stderr_is_journal() -> bool:
    """True when stderr is journald's stream (JOURNAL_STREAM names stderr's dev:ino)."""
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(verbose: bool = False) -> logging.Handler:
    """Log to the journal with structured fields under journald, else to stderr.

    Replaces the root logger's handlers, so it is safe to call again.
    """
    handler: logging.Handler
    if stderr_is_journal():
        from systemd import journal  # uuid, datetime, platform: ~6 ms, only under journald

        handler = journal.JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    handler.addFilter(_Printable())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger(SYSLOG_IDENTIFIER).setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler


def log_event(
    logger: logging.Logger, message: str, level: int = logging.INFO, **fields: object
) -> None:
    """Log message with fields (interface="eth0", queues=[0, 1], uid=1000, lease="...").

    The fields become journal fields (INTERFACE=eth0, QUEUES=0,1) so that
    `journalctl -u xsk-broker INTERFACE=eth0` finds them, and key=value on stderr.
    """
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, str] = {}
    pairs = []
    for key, value in fields.items():
        text = extra[key.upper()] = _field_value(value)
        pairs.append(_pair(key, text))
    extra[_FIELDS_TEXT] = " ".join(pairs)
    # The caller's frame directly: logging's own search for it (stacklevel=2) was a third
    # of an audit line's cost, and there is one audit line per request and per release.
    caller = sys._getframe(1)
    code = caller.f_code
    record = logger.makeRecord(
        logger.name, level, code.co_filename, caller.f_lineno, message, (), None,
        code.co_name, extra,
    )  # fmt: skip
    logger.handle(record)
