"""Typed errors shared by the whole shim, and the status codes they stand for.

Internal code raises these; only service boundaries (the ttrpc server, the
ttrpc client) turn them into or out of wire status codes. `Code` lives here,
not in `shim.ttrpc`, so this module stays at the bottom of the import graph
(`shim.ttrpc` re-exports it).
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Code(enum.IntEnum):
    """gRPC status codes, as ttrpc carries them in `Response.status.code`."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class ShimError(Exception):
    """Base of every typed shim error; `str(err)` is the message sent to the peer."""

    code: ClassVar[Code] = Code.UNKNOWN

    @property
    def message(self) -> str:
        return str(self)


class Cancelled(ShimError):
    code = Code.CANCELLED


class Unknown(ShimError):
    code = Code.UNKNOWN


class InvalidArgument(ShimError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(ShimError):
    code = Code.DEADLINE_EXCEEDED


class NotFound(ShimError):
    code = Code.NOT_FOUND


class AlreadyExists(ShimError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(ShimError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(ShimError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(ShimError):
    code = Code.FAILED_PRECONDITION


class Aborted(ShimError):
    code = Code.ABORTED


class OutOfRange(ShimError):
    code = Code.OUT_OF_RANGE


class Unimplemented(ShimError):
    code = Code.UNIMPLEMENTED


class Internal(ShimError):
    code = Code.INTERNAL


class Unavailable(ShimError):
    code = Code.UNAVAILABLE


_BY_CODE: dict[Code, type[ShimError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
    )
}


def error_class(code: Code) -> type[ShimError]:
    """The error class for a non-OK code."""
    if code is Code.OK:
        raise ValueError("Code.OK is not an error")
    return _BY_CODE[code]
