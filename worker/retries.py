"""How the worker waits out a store or database that stopped answering: bounded retries
(``retry_transient``) and retries for as long as an outage lasts (``retry_until``), both with
capped exponential back-off that wakes early when the attempt should stop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError, OperationalError

from fvb_core.settings import Settings
from fvb_core.storage import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors another try may fix: the store or the database was briefly unreachable.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StorageUnavailable,
    OperationalError,
    InterfaceError,
    BrokerError,
    ConnectionError,
    TimeoutError,
)
DB_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)


class AttemptStopped(Exception):
    """The attempt was cancelled or lost the job while waiting to retry."""


def backoff(settings: Settings, number: int) -> float:
    """Seconds to wait after failed try ``number`` (1, 2, ...): exponential, capped."""
    return min(settings.storage_retry_max_s, settings.storage_retry_base_s * 2 ** (number - 1))


def _pause(delay: float, should_stop: Callable[[], bool] | None) -> bool:
    """Sleep ``delay`` seconds, waking early (True) when ``should_stop()`` turns true."""
    deadline = time.monotonic() + delay
    while True:
        if should_stop is not None and should_stop():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.25))


def retry_transient(
    settings: Settings,
    what: str,
    fn: Callable[[], T],
    *,
    errors: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Call ``fn``; on a transient error try again with exponential backoff, up to
    ``storage_retry_attempts`` tries in all, then re-raise the last error."""
    tries = max(1, settings.storage_retry_attempts)
    for number in range(1, tries + 1):
        try:
            return fn()
        except errors as err:
            if number == tries:
                log.error("%s failed on try %d/%d, giving up: %s", what, number, tries, err)
                raise
            delay = backoff(settings, number)
            log.warning(
                "%s failed on try %d/%d, retrying in %.2fs: %s", what, number, tries, delay, err
            )
            if _pause(delay, should_stop):
                raise AttemptStopped(what) from err
    raise AssertionError("unreachable")


class Outage:
    """How long the uploads of one attempt have been failing, against a limit: the clock
    starts at the first failed try and is shared by the attempt's uploads."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._since: float | None = None

    def failed(self) -> float:
        """Record a failed try; return the seconds since the first one."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        return now - self._since

    @property
    def seconds(self) -> float:
        return 0.0 if self._since is None else time.monotonic() - self._since


def retry_until(
    settings: Settings,
    what: str,
    fn: Callable[[], T],
    *,
    errors: tuple[type[BaseException], ...],
    should_stop: Callable[[], bool] | None = None,
    outage: Outage | None = None,
) -> T:
    """Call ``fn`` until it returns, with capped exponential back-off and no limit on tries.

    Stops with :class:`AttemptStopped` when ``should_stop()`` turns true while waiting, and
    re-raises the last error once ``outage`` has lasted its limit."""
    number = 0
    while True:
        number += 1
        try:
            return fn()
        except errors as err:
            failing = outage.failed() if outage is not None else 0.0
            if outage is not None and failing >= outage.limit_s:
                log.error(
                    "%s failed on try %d, failing for %.0fs (limit %.0fs), giving up: %s",
                    what,
                    number,
                    failing,
                    outage.limit_s,
                    err,
                )
                raise
            delay = backoff(settings, number)
            if outage is not None:
                delay = min(delay, outage.limit_s - failing)
            log.warning("%s failed on try %d, retrying in %.2fs: %s", what, number, delay, err)
            if _pause(delay, should_stop):
                raise AttemptStopped(what) from err
