"""The JSON protocol v1 front end (docs/protocol.md): datagrams in, the core's outcomes out
as datagrams. The seam it fills is described in frontend.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable

from broker.core import NO_OP, Done, NeedsPolkit, Outcome, Service
from broker.errors import BrokerError
from broker.frontend import Answer, Waiting
from broker.policy import Caller
from broker.protocol import (
    MAX_MESSAGE_BYTES,
    LeaseInfo,
    Status,
    decode_message,
    encode_error,
    encode_reply,
)

log = logging.getLogger("xsk-broker")


class JsonFrontEnd:
    """Protocol v1 (docs/protocol.md) on one Service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def refuse(self, error: BrokerError) -> Answer:
        return Answer(encode_error(error))

    def handle(self, caller: Caller, data: bytes) -> Answer | Waiting:
        try:
            message = decode_message(data)
        except BrokerError as error:
            log.debug("refused uid=%d pid=%d: %s", caller.uid, caller.pid, error)
            self.service.observer.decided(NO_OP, error)
            return Answer(encode_error(error))
        return self._answer(lambda: self.service.handle(caller, message))

    def _answer(self, step: Callable[[], Outcome]) -> Answer | Waiting:
        try:
            outcome = step()
        except BrokerError as error:
            return Answer(encode_error(error))
        except Exception as exc:
            log.exception("internal error")
            internal = BrokerError(f"internal error: {exc}")
            self.service.observer.decided(NO_OP, internal)
            return Answer(encode_error(internal))
        if isinstance(outcome, Done):
            return self._encoded(outcome)
        return Waiting(outcome, lambda verdict: self._finish(outcome, verdict))

    def _encoded(self, done: Done) -> Answer:
        reply = fitting(done.reply) if isinstance(done.reply, Status) else done.reply
        try:
            return Answer(encode_reply(reply), done.fds, done.lease_id)
        except Exception as exc:  # nothing the broker sends should fail to encode; if it did,
            log.exception("internal error")  # the sockets must not stay out there
            for fd in done.fds:
                os.close(fd)
            if done.lease_id is not None:
                self.service.undelivered(done.lease_id)
            return Answer(encode_error(BrokerError(f"internal error: {exc}")))

    def _finish(self, check: NeedsPolkit, verdict: BaseException | None) -> Answer:
        answer = self._answer(lambda: check.resume(verdict))
        assert isinstance(answer, Answer)  # resume() returns Done or raises
        return answer


def fitting(status: Status) -> Status:
    """status with as many of its leases as fit one datagram, the rest counted as trimmed:
    each lease adds its compact JSON, and a comma after the first, to the reply without any
    (sized with the largest count it can end up with, so the count never overflows it)."""
    most = status.leases_trimmed + len(status.leases)
    empty = dataclasses.replace(status, leases=[], leases_trimmed=most)
    room = MAX_MESSAGE_BYTES - len(encode_reply(empty))
    shown: list[LeaseInfo] = []
    for lease in status.leases:
        room -= len(json.dumps(lease.to_wire(), separators=(",", ":"))) + (1 if shown else 0)
        if room < 0:
            break
        shown.append(lease)
    return dataclasses.replace(status, leases=shown, leases_trimmed=most - len(shown))
