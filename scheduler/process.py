"""``fvb scheduler``: the release loop, the reaper, the retention sweeper and the roll-ups
(``scheduler/rollups.py``) in one process.

Release passes run back to back while they find work to do and every ``release_interval_s``
otherwise; the reaper every ``reaper_interval_s``; the sweeper (``scheduler/sweeper.py``)
every ``sweep_interval_s`` in a thread of its own. A pass that fails (the database or the
broker is down) is logged and tried again. Several processes may run: the ``release`` lease
lets one release at a time (the others stand by and take over when it stops renewing), and
the reaper's single guarded statement is safe to run from all of them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fvb_core.models_config import ServedModel, load_models_config
from fvb_core.settings import Settings
from scheduler.reaper import reap
from scheduler.release import Releaser
from scheduler.rollups import start_rollups
from scheduler.sweeper import run_sweeper
from scheduler.webhooks import start_webhooks

log = logging.getLogger(__name__)


def run_pass(settings: Settings, releaser: Releaser | None = None) -> dict[str, Any]:
    """Reap, then release: ``{"requeued": [ids], "released": {pool: [ids]}, "lost": {...},
    "leader": bool}``."""
    if releaser is None:
        releaser = Releaser(settings, load_models_config(settings.models_config))
    requeued = reap(settings)
    passes = releaser.run_once()
    return {
        "requeued": requeued,
        "leader": passes is not None,
        "released": {pool: p.released for pool, p in (passes or {}).items()},
        "lost": {pool: p.lost for pool, p in (passes or {}).items()},
    }


def run_scheduler(
    settings: Settings,
    stop: threading.Event,
    models: dict[str, ServedModel] | None = None,
    holder: str | None = None,
) -> None:
    models = models if models is not None else load_models_config(settings.models_config)
    releaser = Releaser(settings, models, holder=holder)
    log.info(
        "scheduler started: pools %s, %d message(s) per live worker, reaper every %.1fs",
        ", ".join(releaser.pools),
        settings.release_per_worker,
        settings.reaper_interval_s,
    )
    next_reap = 0.0
    # Retention and orphans: its own thread, so a slow store never holds up a release.
    sweeper = threading.Thread(
        target=run_sweeper, args=(settings, stop, releaser.holder), name="sweeper", daemon=True
    )
    sweeper.start()
    # Webhook delivery (scheduler/webhooks.py): its own thread, a slow receiver holds up nothing.
    webhooks = start_webhooks(settings, stop)
    # The console's and /metrics' roll-ups (scheduler/rollups.py).
    rollups = start_rollups(settings, stop, models)
    try:
        while not stop.is_set():
            busy = False
            try:
                if time.monotonic() >= next_reap:
                    reap(settings)
                    next_reap = time.monotonic() + settings.reaper_interval_s
                passes = releaser.run_once() or {}
                busy = any(p.released for p in passes.values())
            except Exception:
                log.exception(
                    "scheduler pass failed; retrying in %.1fs", settings.release_interval_s
                )
            if not busy:
                stop.wait(settings.release_interval_s)
    finally:
        try:
            releaser.step_down()
        except Exception:  # the database may be the reason we stop
            log.warning("could not give the release lease up; it expires by itself")
        sweeper.join(10)
        webhooks.join(10)
        rollups.join(10)
    log.info("scheduler stopped")
