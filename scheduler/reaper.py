"""The reaper: puts lost work back in motion, every ``reaper_interval_s``.

1. Running jobs whose worker stopped heart-beating for ``heartbeat_timeout_s`` go back to
   ``queued`` (or ``failed`` on their last attempt): ``transitions.requeue_stale``.
2. Queued jobs never dispatched (the broker was down at submission, or the job was just
   requeued), or dispatched longer than ``redispatch_after_s`` ago without being claimed
   (the message was lost), are sent again through :func:`scheduler.dispatch.dispatch`.

A message sent twice is harmless: only one worker can claim the job's next attempt.
Run it alone with ``python -m scheduler.reaper``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import select

from fvb_core.db import transitions
from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.models_config import ServedModel, load_models_config
from fvb_core.settings import Settings, get_settings
from scheduler.dispatch import dispatch

log = logging.getLogger(__name__)


def run_reaper_once(
    settings: Settings, models: dict[str, ServedModel] | None = None
) -> dict[str, Any]:
    """One pass. Returns ``{"requeued": [ids], "dispatched": [ids], "undispatchable": [ids],
    "dispatch_failed": [ids]}``."""
    models = models if models is not None else load_models_config(settings.models_config)
    with session_scope(settings.database_url) as session:
        requeued = transitions.requeue_stale(session, settings.heartbeat_timeout_s)
    if requeued:
        log.warning(
            "requeued %d job(s) whose worker stopped heart-beating: %s", len(requeued), requeued
        )

    with session_scope(settings.database_url) as session:
        ids = transitions.undispatched(session, settings.redispatch_after_s)
        rows = (
            {
                row.id: row
                for row in session.execute(
                    select(Job.id, Job.model, Job.priority).where(Job.id.in_(ids))
                )
            }
            if ids
            else {}
        )

    dispatched: list[str] = []
    undispatchable: list[str] = []
    failed: list[str] = []
    for job_id in ids:
        row = rows.get(job_id)
        served = models.get(row.model) if row is not None else None
        if served is None:
            # The deployment no longer serves this model: no pool would take the job.
            undispatchable.append(job_id)
            continue
        if failed:  # the broker refused once this pass; try the rest next pass
            failed.append(job_id)
            continue
        try:
            dispatch(settings, job_id, served.pool, row.priority)
        except Exception as err:
            log.warning("re-dispatch of %s failed (broker down?): %s", job_id, err)
            failed.append(job_id)
            continue
        dispatched.append(job_id)
    if dispatched:
        log.info("dispatched %d queued job(s): %s", len(dispatched), dispatched)
    if undispatchable:
        log.warning("no served model for queued job(s) %s; left queued", undispatchable)
    return {
        "requeued": requeued,
        "dispatched": dispatched,
        "undispatchable": undispatchable,
        "dispatch_failed": failed,
    }


def run_reaper(settings: Settings, stop_event: threading.Event) -> None:
    """Run passes every ``reaper_interval_s`` until `stop_event` is set. A failing pass (the
    database is down, say) is logged and the next one tries again."""
    models = load_models_config(settings.models_config)
    log.info("reaper started: every %.1fs", settings.reaper_interval_s)
    while not stop_event.is_set():
        try:
            run_reaper_once(settings, models)
        except Exception:
            log.exception("reaper pass failed; retrying in %.1fs", settings.reaper_interval_s)
        stop_event.wait(settings.reaper_interval_s)
    log.info("reaper stopped")


def main() -> None:
    import signal

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_reaper(get_settings(), stop)


if __name__ == "__main__":
    main()
