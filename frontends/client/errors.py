"""The errors a bus request can end with: one class per `ErrorCode`, all `BusError`s."""

from __future__ import annotations

from broker import protocol
from broker.protocol import ErrorCode


class BusError(Exception):
    """An explicit error from the bus; `code` is the protocol's error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(BusError):
    code = ErrorCode.BAD_REQUEST


class UnknownModel(BusError):
    code = ErrorCode.UNKNOWN_MODEL


class NoWorker(BusError):
    code = ErrorCode.NO_WORKER


class Overloaded(BusError):
    code = ErrorCode.OVERLOADED


class QueueTimeout(Overloaded):
    code = ErrorCode.QUEUE_TIMEOUT


class ContextLengthExceeded(BusError):
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED


class WorkerLost(BusError):
    code = ErrorCode.WORKER_LOST


class BrokerUnreachable(BusError):
    """The broker did not answer, or restarted and forgot the request."""

    code = ErrorCode.UNKNOWN_REQUEST


class DeadlineExceeded(BusError):
    """The request's `timeout` ran out before it reached a worker."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(BusError):
    """Reading from a stream that this client cancelled."""


_ERRORS = {cls.code: cls for cls in (BadRequest, UnknownModel, NoWorker, Overloaded, QueueTimeout,
                                      ContextLengthExceeded, WorkerLost, BrokerUnreachable, DeadlineExceeded)}


def error_from(error: protocol.Error) -> BusError:
    return _ERRORS.get(error.code, BusError)(error.message, error.field)
