"""Reading request bodies at the edge: size limits, strict UTF-8 JSON, text every layer can
store.

Everything here turns a bad body into a 400/413 naming what is wrong, before any of it is
stored:

- a body over the route's limit is refused from its ``Content-Length``, or as soon as the
  streamed bytes pass the limit (a chunked upload is not read to the end first);
- JSON must be UTF-8 (``json.loads`` would also take UTF-16 and UTF-32), nest at most
  :data:`MAX_JSON_DEPTH` deep, and use plain JSON numbers (no ``NaN``/``Infinity``);
- every string, keys included, must be encodable as UTF-8: a lone surrogate (``"\\ud800"``) is
  valid JSON but no database, log or response can hold it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from scheduler.api.errors import ApiError

MAX_JSON_DEPTH = 64
#: Error params name the path this deep (``requests[3].metadata.shot``), then stop.
_NAMED_DEPTH = 4


def too_large(limit: int, size: int | None = None) -> ApiError:
    told = f"request body is {size} bytes" if size is not None else "request body is too large"
    return ApiError(413, f"{told}; at most {limit} bytes accepted", code="request_too_large")


def check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit, int(declared))


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 once it passes ``limit`` bytes."""
    check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _charset(request: Request) -> str | None:
    for parameter in request.headers.get("content-type", "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, request: Request | None = None) -> Any:
    """``raw`` as strict JSON, or 400 (``invalid_json``) saying why."""
    charset = _charset(request) if request is not None else None
    if charset not in (None, "utf-8", "utf8"):
        raise ApiError(400, f"request body must be UTF-8 JSON, not {charset}", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(
            400, f"request body is not UTF-8 (byte {err.start} is not valid)", code="invalid_json"
        ) from None
    try:
        document = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(
            400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        ) from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, ints past Python's digit limit
        raise ApiError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    check_document(document)
    return document


def check_document(document: Any, root: str = "") -> None:
    """Depth and text checks over a parsed document, iteratively (no recursion to exhaust).

    The param named in the error is the top-level field the bad value sits in (``prompt``,
    ``metadata``, ``requests[3].prompt``...).
    """
    stack: list[tuple[Any, str, int]] = [(document, root, 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(
                400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
            )
        if isinstance(value, str):
            check_text(where or "body", value)
        elif isinstance(value, dict):
            for key, item in value.items():
                check_text(where or "body", key, what=f"a key of {where or 'the body'}")
                child = _join(where, key) if depth < _NAMED_DEPTH else where
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                child = f"{where}[{index}]" if depth < _NAMED_DEPTH else where
                stack.append((item, child, depth + 1))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_text(param: str, text: str, what: str = "the text") -> None:
    """400 when ``text`` holds a code point UTF-8 cannot encode (a lone surrogate). The
    message never quotes ``text``: the answer itself could not be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code_point = f"U+{ord(text[err.start]):04X}"
        raise ApiError.invalid(
            param,
            f"{param}: {what} holds the lone surrogate {code_point} at position {err.start}; "
            "send valid Unicode (UTF-8)",
            "invalid_text",
        ) from None


async def read_json(request: Request, limit: int) -> Any:
    """A JSON body of at most ``limit`` bytes, checked as above."""
    return parse_json(await read_limited(request, limit), request)
