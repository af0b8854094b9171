"""Every error the API returns, in the OpenAI shape.

``{"error": {"message", "type", "param", "code"}}`` with the HTTP status that says what went
wrong, so the official SDK raises the matching exception (``BadRequestError``,
``NotFoundError``, ``RateLimitError``...). Routes raise :class:`ApiError`; FastAPI's own
validation errors (400, like every other bad input), unknown routes and wrong methods are
rewritten into the same shape here. A database that cannot be reached is 503
``database_unavailable`` with ``Retry-After``.

:class:`RequestMiddleware` is the outermost layer: it gives every answer an
``X-Request-ID`` (the caller's, when it sent a sane one) and turns an unexpected exception
into a 500 in the same shape. Starlette's own catch-all answers too but then re-raises, and
uvicorn closes the keep-alive connection on a re-raise: the client's next request on it
would fail. Ours answers and keeps the connection.
"""

from __future__ import annotations

import logging
import re
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fvb_core import logs

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
#: What a client may choose as its own request id (anything else is replaced).
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: How long a client should wait when the database is down (it usually comes back fast).
DATABASE_RETRY_AFTER_S = 5

_TYPES = {
    401: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error answer: status, a message for people, the field at fault, a code for code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def invalid(cls, param: str, message: str, code: str = "invalid_value") -> ApiError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def not_found(cls, message: str, param: str | None = None) -> ApiError:
        return cls(404, message, param=param, code="not_found")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the methods of
    the first route whose path matched (``GET /v1/videos`` and ``POST /v1/videos`` are two
    routes), so its ``Allow`` would be short. Asked route by route through ``matches``, the
    one question every route (and FastAPI's included routers) answers."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return error_response(
        exc.status_code,
        str(exc.detail),
        code=codes.get(exc.status_code),
        headers=headers or None,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # loc is ("query", "limit") or ("body", "field", ...): the field is what follows the source.
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else None)
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(400, message, param=param, code="invalid_value")


def is_database_down(exc: BaseException) -> bool:
    """An error that says the database could not be reached (or the connection broke)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def database_unavailable() -> JSONResponse:
    return error_response(
        503,
        "the database is unavailable; retry later",
        code="database_unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", str(exc).splitlines()[0])
    return database_unavailable()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for database_error in (OperationalError, InterfaceError):
        app.add_exception_handler(database_error, _database_error)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _SANE_REQUEST_ID.match(given):
                return given
    return f"req_{secrets.token_hex(12)}"


class RequestMiddleware:
    """``X-Request-ID`` on every answer; an unexpected exception becomes a 500 answer that
    keeps the connection open (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        # Every line logged while this request is served carries its id (fvb_core/logs.py);
        # the context is this request's task's own, so nothing needs resetting after it.
        logs.bind(request_id=request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # half an answer is out: only closing the connection tells the client
                raise
            if is_database_down(exc):
                log.warning("request %s: database unavailable: %s", request_id, exc)
                response = database_unavailable()
            else:
                log.exception("request %s failed", request_id, exc_info=exc)
                response = error_response(
                    500,
                    f"internal server error (request id {request_id})",
                    code="internal_error",
                )
            await response(scope, receive, send_with_id)
