"""The reaper: running jobs whose worker stopped heart-beating for ``heartbeat_timeout_s``
go back to the queue (as attempt n+1 once claimed again), or fail on their last attempt, or
end cancelled when a cancel was asked for: one statement for all of them
(``transitions.requeue_stale``). Lost messages are the release pass's business
(``scheduler/release.py``): it sees them missing from the queue."""

from __future__ import annotations

import logging

from fvb_core.db import transitions
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings

log = logging.getLogger(__name__)


def reap(settings: Settings) -> list[str]:
    """One pass; the ids of the jobs put back in the queue."""
    with session_scope(settings.database_url) as session:
        requeued = transitions.requeue_stale(session, settings.heartbeat_timeout_s)
    if requeued:
        log.warning("requeued %d job(s) whose worker stopped heart-beating", len(requeued))
    return requeued
