"""The JSON protocol v1 front end: datagrams in, the core's outcomes out as datagrams.

A front end turns its wire's bytes into the core's typed messages and the core's results
(or errors) into its wire's replies; the server moves bytes and fds and never looks inside.
A second wire protocol is a second class with the same two methods on the same core.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.core import Done, NeedsPolkit, Outcome, Service
from broker.errors import BrokerError
from broker.policy import Caller
from broker.protocol import decode_message, encode_error, encode_reply

log = logging.getLogger("xsk-broker")


@dataclass(frozen=True)
class Answer:
    """What goes back on a connection; lease_id names the lease whose fds these are."""

    data: bytes
    fds: Sequence[int] = ()
    lease_id: str | None = None


@dataclass(frozen=True)
class Waiting:
    """The answer waits for polkit: ask it for check.action, then finish(verdict), where
    verdict is None for yes or the error that says no."""

    check: NeedsPolkit
    finish: Callable[[BaseException | None], Answer]


class JsonFrontEnd:
    """Protocol v1 (docs/protocol.md) on one Service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def handle(self, caller: Caller, data: bytes) -> Answer | Waiting:
        try:
            message = decode_message(data)
        except BrokerError as error:
            log.debug("refused uid=%d pid=%d: %s", caller.uid, caller.pid, error)
            return Answer(encode_error(error))
        return self._answer(lambda: self.service.handle(caller, message))

    def _answer(self, step: Callable[[], Outcome]) -> Answer | Waiting:
        try:
            outcome = step()
        except BrokerError as error:
            return Answer(encode_error(error))
        except Exception as exc:
            log.exception("internal error")
            return Answer(encode_error(BrokerError(f"internal error: {exc}")))
        if isinstance(outcome, Done):
            return self._encoded(outcome)
        return Waiting(outcome, lambda verdict: self._finish(outcome, verdict))

    def _encoded(self, done: Done) -> Answer:
        try:
            return Answer(encode_reply(done.reply), done.fds, done.lease_id)
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
