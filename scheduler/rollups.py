"""The roll-up loop of the scheduler process (``fvb_core/db/rollup.py``): the job trail
folded into the console's and /metrics' small tables about once a second, and queue depth
per pool sampled once a minute (samples and minute roll-ups older than a day pruned).

A fold that fails (the database is down) is logged and tried again; readers stay exact
meanwhile (they add the pending events), only slower as the pending events grow. Several
scheduler processes may run the loop: folds are serialised by a lock in the database, and
the samples are upserts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import timedelta

from fvb_core.db import rollup
from fvb_core.db.models import utcnow
from fvb_core.db.session import session_scope
from fvb_core.models_config import ServedModel
from fvb_core.settings import Settings

log = logging.getLogger(__name__)

#: How long queue-depth samples and minute roll-ups are kept (the console shows an hour).
SAMPLES_KEPT = timedelta(days=1)


def run_pass(settings: Settings, pool_of: Mapping[str, str], last_minute=None):
    """Fold what is pending (in batches, until less than a batch is left); sample the queues
    when a new minute began since ``last_minute``. Returns (events folded, this minute)."""
    folded = 0
    while True:
        with session_scope(settings.database_url) as session:
            done = rollup.fold(session)
        folded += done
        if done < rollup.FOLD_LIMIT:
            break
    minute = utcnow().replace(second=0, microsecond=0)
    if minute != last_minute:
        with session_scope(settings.database_url) as session:
            rollup.sample_queues(session, pool_of, minute)
            rollup.prune_samples(session, minute - SAMPLES_KEPT)
    return folded, minute


def run_rollups(
    settings: Settings, stop: threading.Event, models: Mapping[str, ServedModel]
) -> None:
    pool_of = {name: served.pool for name, served in models.items()}
    minute = None
    while not stop.is_set():
        try:
            folded, minute = run_pass(settings, pool_of, minute)
            if folded:
                log.debug("rolled up %d job events", folded)
        except Exception:
            log.exception("roll-up pass failed; retrying in %.1fs", settings.rollup_interval_s)
        stop.wait(settings.rollup_interval_s)


def start_rollups(
    settings: Settings, stop: threading.Event, models: Mapping[str, ServedModel]
) -> threading.Thread:
    thread = threading.Thread(
        target=run_rollups, args=(settings, stop, models), name="rollups", daemon=True
    )
    thread.start()
    return thread
