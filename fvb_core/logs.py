"""One log format for every long-running process of the service (API, scheduler, worker):
JSON lines (python-json-logger), each carrying the context of the work it belongs to.

The context is a :mod:`contextvars` dict: the API binds ``request_id`` for each request
(``scheduler/api/errors.py``), the worker binds ``job_id``, ``attempt`` and ``worker_id``
for each job, on the render and on the finishing thread (``worker/runner.py``). A filter on
the one handler copies it into every record, so a library's line logged while a job renders
has the job's id too, and ``grep job_id`` over a worker's log gives the whole of one job.

``FVB_LOG_FORMAT=text`` gives the old one-line text format (for a terminal), with the same
fields appended as ``key=value``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

#: The fields a line may carry from its context, in the order the text format shows them.
CONTEXT_FIELDS = ("request_id", "job_id", "attempt", "worker_id")

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("fvb_log_context")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"


def current() -> dict[str, Any]:
    """The fields bound here (a copy)."""
    return dict(_context.get({}))


def bind(**fields: Any) -> contextvars.Token:
    """Add ``fields`` (None values left out) to this context until :func:`unbind`."""
    added = {k: v for k, v in fields.items() if v is not None}
    return _context.set({**_context.get({}), **added})


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """``with bound(job_id=...):`` every line logged inside carries the fields."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


class ContextFilter(logging.Filter):
    """Copies the bound fields into each record (a field the call gave in ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get({}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if hasattr(record, k)]
        return f"{line} [{' '.join(fields)}]" if fields else line


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "text":
        return _TextFormatter(TEXT_FORMAT)
    if fmt != "json":
        raise ValueError(f"FVB_LOG_FORMAT: must be 'json' or 'text', not {fmt!r}")
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(processName)s %(process)d %(threadName)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level"},
    )


def configure(level: str | int = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send every logger's records to one handler on ``stream`` (stderr), in ``fmt``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
