"""Mapping between wire status codes and the shim's typed errors."""

from __future__ import annotations

from shim.errors import Code, ShimError, Unknown, error_class


class TtrpcError(Exception):
    """A non-OK status from (or for) the peer, with the exact code and message.

    The client raises a ShimError subclass whose `__cause__` is one of these;
    a handler may raise one directly to answer with any code.
    """

    def __init__(self, code: Code | int, message: str) -> None:
        super().__init__(f"{_code_name(code)}: {message}")
        self.code = _to_code(code)
        self.raw_code = int(code)
        self.message = message


def error_for_status(code: Code | int, message: str) -> ShimError:
    """The typed error for a peer's non-OK status (NOT_FOUND -> NotFound, ...)."""
    as_code = _to_code(code)
    if as_code is Code.OK:
        raise ValueError("status code 0 (OK) is not an error")
    if as_code is Code.UNKNOWN and int(code) != Code.UNKNOWN:
        return Unknown(f"status code {int(code)}: {message}")
    return error_class(as_code)(message)


def status_for_exception(exc: BaseException) -> tuple[Code, str]:
    """Server side: the status to answer for an error a handler raised."""
    if isinstance(exc, TtrpcError):
        return exc.code, exc.message
    if isinstance(exc, ShimError):
        return exc.code, str(exc)
    return Code.INTERNAL, str(exc) or type(exc).__name__


def _to_code(code: Code | int) -> Code:
    try:
        return Code(code)
    except ValueError:
        return Code.UNKNOWN


def _code_name(code: Code | int) -> str:
    as_code = _to_code(code)
    if as_code is Code.UNKNOWN and int(code) != Code.UNKNOWN:
        return f"code {int(code)}"
    return as_code.name
