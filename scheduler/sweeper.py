"""The retention sweeper: expired videos' objects deleted, orphans and stale uploads removed.

One pass (:func:`sweep`) does three bounded things:

1. **Expiry.** A succeeded job has ``expires_at`` = ``finished_at`` + its ``retention_s``
   (its batch's, else ``FVB_RETENTION_S``; set by ``transitions.succeed``). Up to
   ``EXPIRE_BATCH`` jobs past it and not yet ``expired_at`` (the partial index
   ``ix_jobs_expiring``) have every object under their prefixes deleted, *then* are marked
   ``expired_at`` in one guarded statement (``transitions.mark_expired``). Objects first: a
   pass that dies half-way leaves rows to retry, never a row marked expired whose objects
   are still stored.
2. **Orphans.** A walk over the bucket in key order, ``ORPHAN_PAGES_PER_PASS`` pages of 1000
   keys a pass, resumed where the last pass stopped (``SweepState.cursor``, kept in memory;
   a new process starts from the beginning). Of each page, the keys older than
   ``orphan_max_age_s`` whose job says they are not its video are deleted: attempts other
   than the one that succeeded, every attempt of a failed or cancelled job, attempts before
   the current one of an unfinished job, and everything of a job that expired, was deleted
   or has no row. The age is what makes it safe: nothing a live attempt or a request in
   flight writes is that old (the API stores an input image just before inserting its job).
3. **Unfinished multipart uploads** (a worker that died mid-upload) initiated before the
   same age are aborted, which frees their parts.

Every step is idempotent (deleting a missing key succeeds, the mark is guarded), so several
scheduler processes may sweep at once; the loop (:func:`run_sweeper`) still takes the
``sweep`` lease so that usually one does, in its own thread, so a slow store never holds up
releases.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from fvb_core.db import fleet, transitions
from fvb_core.db.models import Job, utcnow
from fvb_core.db.session import session_scope
from fvb_core.jobs import JobStatus
from fvb_core.settings import Settings
from fvb_core.storage import KeyOwner, VideoStore, key_owner

log = logging.getLogger(__name__)

#: Expired videos handled per pass.
EXPIRE_BATCH = 500
#: Pages (of up to 1000 keys) of the bucket walk per pass.
ORPHAN_PAGES_PER_PASS = 5
#: Unfinished multipart uploads looked at per pass.
UPLOADS_PER_PASS = 1000
#: Store calls in flight at once while listing expired videos' prefixes.
LIST_THREADS = 8
#: Job ids per ``IN (...)`` lookup.
LOOKUP_CHUNK = 500
LEASE = "sweep"


@dataclass
class SweepState:
    """What a process remembers between passes: where its walk over the bucket is."""

    cursor: str = ""


@dataclass
class SweepSummary:
    #: Videos marked expired by this pass.
    expired: list[str] = field(default_factory=list)
    #: Objects of those videos deleted.
    expired_objects: int = 0
    #: Orphaned keys deleted.
    orphans: list[str] = field(default_factory=list)
    #: Keys the bucket walk looked at.
    scanned: int = 0
    #: Keys of the unfinished multipart uploads aborted.
    aborted_uploads: list[str] = field(default_factory=list)


def sweep(
    settings: Settings,
    store: VideoStore,
    now: datetime | None = None,
    state: SweepState | None = None,
) -> SweepSummary:
    """One pass (see the module's docstring); ``now`` (aware) defaults to the clock."""
    now = now or utcnow()
    state = state if state is not None else SweepState()
    summary = SweepSummary()
    _expire(settings, store, now, summary)
    cutoff = now - timedelta(seconds=settings.orphan_max_age_s)
    _remove_orphans(settings, store, cutoff, state, summary)
    _abort_stale_uploads(store, cutoff, summary)
    if summary.expired or summary.orphans or summary.aborted_uploads:
        log.info(
            "sweep: %d video(s) expired (%d objects), %d orphaned object(s), %d stale "
            "upload(s) aborted",
            len(summary.expired),
            summary.expired_objects,
            len(summary.orphans),
            len(summary.aborted_uploads),
        )
    return summary


def _expire(settings: Settings, store: VideoStore, now: datetime, summary: SweepSummary) -> None:
    with session_scope(settings.database_url) as session:
        # Written out as ix_jobs_expiring's predicate, so every planner takes that index.
        due = list(
            session.execute(
                select(Job.id)
                .where(
                    Job.expires_at.is_not(None),
                    Job.expired_at.is_(None),
                    Job.expires_at <= now,
                )
                .order_by(Job.expires_at)
                .limit(EXPIRE_BATCH)
            ).scalars()
        )
    if not due:
        return
    with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="sweep-list") as pool:
        keys = [key for job_keys in pool.map(store.job_keys, due) for key in job_keys]
    summary.expired_objects = store.delete_many(keys)
    with session_scope(settings.database_url) as session:
        summary.expired = transitions.mark_expired(session, due, now)


@dataclass(frozen=True)
class _Row:
    status: str
    attempt: int
    gone: bool  # expired or deleted: none of its objects should be stored


def is_orphan(owner: KeyOwner, row: _Row | None) -> bool:
    """Whether the key of ``owner`` is not (and will never be) part of its job's video."""
    if row is None or row.gone:
        return True
    if owner.attempt is None:  # the input image, or a name we do not know: the job's
        return False
    if row.status == JobStatus.SUCCEEDED:
        return owner.attempt != row.attempt
    if JobStatus(row.status).is_final:  # failed or cancelled: a retry is a later attempt
        return True
    return owner.attempt < row.attempt


def _rows(settings: Settings, job_ids: set[str]) -> dict[str, _Row]:
    ids = sorted(job_ids)
    rows: dict[str, _Row] = {}
    with session_scope(settings.database_url) as session:
        for start in range(0, len(ids), LOOKUP_CHUNK):
            for r in session.execute(
                select(Job.id, Job.status, Job.attempt, Job.expired_at, Job.deleted_at).where(
                    Job.id.in_(ids[start : start + LOOKUP_CHUNK])
                )
            ):
                gone = r.expired_at is not None or r.deleted_at is not None
                rows[r.id] = _Row(r.status, r.attempt, gone)
    return rows


def _remove_orphans(
    settings: Settings,
    store: VideoStore,
    cutoff: datetime,
    state: SweepState,
    summary: SweepSummary,
) -> None:
    for _ in range(ORPHAN_PAGES_PER_PASS):
        page, more = store.list_page(start_after=state.cursor)
        summary.scanned += len(page)
        old = [
            (o.key, owner)
            for o in page
            if o.last_modified < cutoff and (owner := key_owner(o.key)) is not None
        ]
        if old:
            rows = _rows(settings, {owner.job_id for _, owner in old})
            doomed = [key for key, owner in old if is_orphan(owner, rows.get(owner.job_id))]
            store.delete_many(doomed)
            summary.orphans += doomed
        # Moved on only once the page is dealt with: a failed pass looks at it again.
        state.cursor = page[-1].key if more else ""
        if not more:
            break


def _abort_stale_uploads(store: VideoStore, cutoff: datetime, summary: SweepSummary) -> None:
    for upload in store.unfinished_uploads(UPLOADS_PER_PASS):
        if upload.initiated < cutoff:
            store.abort_upload(upload.key, upload.upload_id)
            summary.aborted_uploads.append(upload.key)


def run_sweeper(
    settings: Settings,
    stop: threading.Event,
    holder: str | None = None,
    store: VideoStore | None = None,
) -> None:
    """Sweep every ``sweep_interval_s`` (the first pass one interval after the start) until
    ``stop``, while this process holds the ``sweep`` lease (another takes over when it stops
    renewing). A pass that fails (the store or the database is down) is logged and tried
    again at the next interval."""
    holder = holder or f"{socket.gethostname()}:{os.getpid()}"
    store = store or VideoStore(settings)
    state = SweepState()
    ttl = 2 * settings.sweep_interval_s
    try:
        while not stop.wait(settings.sweep_interval_s):
            try:
                with session_scope(settings.database_url) as session:
                    ours = fleet.hold_lease(session, LEASE, holder, ttl)
                if ours:
                    sweep(settings, store, state=state)
            except Exception:
                log.exception("sweep failed; retrying in %.0fs", settings.sweep_interval_s)
    finally:
        try:
            with session_scope(settings.database_url) as session:
                fleet.release_lease(session, LEASE, holder)
        except Exception:
            log.warning("could not give the sweep lease up; it expires by itself")
