"""The errors a client can cause, each carrying its HTTP status and OpenAI error type and code.

Billing, the engine and the routes raise these; the app turns each into an OpenAI-style
``{"error": {...}}`` body with the right status and headers.
"""
from __future__ import annotations

from typing import Optional


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (a lone surrogate echoed from a request) written as
    a backslash escape, so that an error body can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    status = 400
    type = "invalid_request_error"
    code: Optional[str] = None

    def __init__(self, message: str, *, status: Optional[int] = None, type: Optional[str] = None,
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        message, param = printable(message), None if param is None else printable(param)
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.type = type or self.type
        self.code = code if code is not None else self.code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        from .protocol import ErrorInfo, ErrorResponse

        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class ContextLengthExceeded(APIError):
    status, type, code = 400, "invalid_request_error", "context_length_exceeded"


class InvalidKey(APIError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(APIError):
    status, type, code = 403, "invalid_request_error", "forbidden"


class ModelNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class Conflict(APIError):
    status, type, code = 409, "invalid_request_error", "idempotency_conflict"


class IdempotentReplay(Exception):
    """Not an error: the Idempotency-Key's request has finished; ``response`` is what it answered."""

    def __init__(self, response: dict):
        super().__init__("stored response")
        self.response = response


class PayloadTooLarge(APIError):
    status, type = 413, "invalid_request_error"


class RateLimited(APIError):
    status, code = 429, "rate_limit_exceeded"  # type is "requests" or "tokens": which limit was hit


class InsufficientQuota(APIError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class Overloaded(APIError):
    status, type = 503, "server_error"


def user_error(fn, *args):
    """``fn(*args)``, with a ValueError (the library's word for a bad argument) turned into a 400."""
    try:
        return fn(*args)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
