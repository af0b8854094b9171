"""JSONL uploads of batch items: ``POST /v1/batches`` and ``POST /v1/batches/{id}/videos``
with ``Content-Type: application/x-ndjson`` (or ``application/jsonl``).

The body is read as it arrives and stored ``CHUNK`` lines at a time through the same path
as a JSON append (:func:`scheduler.api.batches.append`), so an upload of any number of
items holds one chunk in memory, each line is stored whole or not at all, and a line the
API refuses is reported by its line number while the others are stored. Each line is a
video create body (with an optional ``item_key``) or a JSON string that is just the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio.from_thread
from fastapi import Request
from sqlalchemy.orm import Session

from fvb_core.api_keys import Principal
from scheduler.api import batches
from scheduler.api.body import parse_json
from scheduler.api.context import ApiContext
from scheduler.api.errors import ApiError, error_body

JSONL_TYPES = frozenset(
    {"application/x-ndjson", "application/jsonl", "application/json-lines", "application/jsonlines"}
)
#: Lines stored per transaction.
CHUNK = 500
#: One line (one video body, an inline image included) may be this long.
MAX_LINE_BYTES = 16 * 1024 * 1024
#: Refused lines reported one by one in the answer; past this only counted.
MAX_REPORTED_ERRORS = 100


def is_jsonl(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media in JSONL_TYPES


def _blocking(chunks: AsyncIterator[bytes]) -> Iterator[bytes]:
    """The request's body chunks, read from a route running in a worker thread."""
    while True:
        try:
            yield anyio.from_thread.run(chunks.__anext__)
        except StopAsyncIteration:
            return


def lines(request: Request) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, bytes) of every non-blank line, as the body arrives."""
    pending = b""
    number = 0
    for chunk in _blocking(request.stream().__aiter__()):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            number += 1
            if raw.strip():
                yield number, raw
        if len(pending) > MAX_LINE_BYTES:
            raise ApiError.invalid(
                "body", f"line {number + 1} is longer than {MAX_LINE_BYTES} bytes"
            )
    if pending.strip():
        yield number + 1, pending


@dataclasses.dataclass
class Uploaded:
    lines: int = 0
    created: int = 0
    existing: int = 0
    errors: list[tuple[int, ApiError]] = dataclasses.field(default_factory=list)
    error_count: int = 0

    def refuse(self, line: int, err: ApiError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append((line, err))

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "created": self.created,
            "existing": self.existing,
            "error_count": self.error_count,
            "errors": [
                {"line": line, "error": error_body(e.status, e.message, e.param, e.code)["error"]}
                for line, e in self.errors
            ],
        }


def _item(raw: bytes) -> Any:
    document = parse_json(raw)
    return {"prompt": document} if isinstance(document, str) else document


def _as_line(line: int, index: int, err: ApiError) -> ApiError:
    """``requests[3].size: ...`` of a chunk, said of the line it came from."""
    where = f"requests[{index}]"
    param = (err.param or "").removeprefix(where).lstrip(".") or None
    message = err.message.removeprefix(f"{where}: ")
    return ApiError(err.status, f"line {line}: {message}", param=param, code=err.code)


def upload(
    session: Session,
    context: ApiContext,
    principal: Principal,
    batch_id: str,
    numbered: Iterator[tuple[int, bytes]],
) -> Uploaded:
    outcome = Uploaded()
    chunk: list[tuple[int, Any]] = []

    def flush() -> None:
        if not chunk:
            return
        try:
            added = batches.append(
                session, context, principal, batch_id, {"requests": [i for _, i in chunk]}
            )
        except ApiError as err:
            if err.status == 400:  # a rule over the whole chunk (two lines, one item_key)
                for line, _ in chunk:
                    outcome.refuse(
                        line, ApiError(400, f"line {line}: {err.message}", param=err.param)
                    )
                chunk.clear()
                return
            first = chunk[0][0]
            err.message = (
                f"{err.message} (lines before {first} are stored in batch '{batch_id}'; "
                "send the rest again: item keys make re-sending harmless)"
            )
            raise
        outcome.created += len(added.created)
        outcome.existing += len(added.existing)
        for index, err in added.errors:
            outcome.refuse(chunk[index][0], _as_line(chunk[index][0], index, err))
        chunk.clear()

    for line, raw in numbered:
        outcome.lines += 1
        try:
            chunk.append((line, _item(raw)))
        except ApiError as err:
            outcome.refuse(
                line,
                ApiError(err.status, f"line {line}: {err.message}", param=err.param, code=err.code),
            )
            continue
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return outcome
