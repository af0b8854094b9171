"""The worker's row in the registry (``workers``): the scheduler releases a pool's jobs only
as fast as its live consumers can take them, so each consumer says it is there.

Runs in the Celery main process (the one that talks to the broker), from ``worker_ready``
to ``worker_shutdown``: a daemon thread beats every ``worker_heartbeat_s``, each beat with
what the worker says of itself (``worker/telemetry.py``: GPUs, its children's job ids). A
database that is down only delays the beats (the scheduler then counts the consumer as gone after
``worker_timeout_s`` and releases nothing more to it until it beats again).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery import signals
from sqlalchemy.exc import SQLAlchemyError

from fvb_core.db import fleet
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings
from worker import telemetry

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, settings: Settings, worker_id: str, gpus: int) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.gpus = gpus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="presence", daemon=True)

    def connect(self) -> None:
        """Start beating once Celery is ready to consume, stop when it shuts down."""
        signals.worker_ready.connect(lambda **_: self.start(), weak=False)
        signals.worker_shutdown.connect(lambda **_: self.stop(), weak=False)

    def start(self) -> None:
        self._register()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            with session_scope(self.settings.database_url) as session:
                fleet.stop_worker(session, self.worker_id)
        except SQLAlchemyError as err:
            log.warning("could not mark worker %s stopped: %s", self.worker_id, err)

    def _register(self) -> None:
        try:
            with session_scope(self.settings.database_url) as session:
                fleet.register_worker(
                    session,
                    self.worker_id,
                    self.settings.worker_pool,
                    self.gpus,
                    socket.gethostname(),
                    os.getpid(),
                )
            log.info("registered %s in pool %s", self.worker_id, self.settings.worker_pool)
        except SQLAlchemyError as err:
            log.warning("could not register worker %s: %s", self.worker_id, err)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            try:
                stats = telemetry.collect(self.settings.worker_gpus, self.settings.worker_device)
                with session_scope(self.settings.database_url) as session:
                    known = fleet.beat_worker(session, self.worker_id, stats)
                if not known:
                    self._register()
            except SQLAlchemyError as err:
                log.warning("worker heartbeat failed: %s", err)
