"""The ``fvb.render(job_id)`` task: claim the job, then hand it to this process's runner.

The message only says "please run job X"; the job row decides. A message for a job that is
finished, cancelled or owned by a live attempt (a redelivered duplicate) is acknowledged
without doing anything. The runner (and torch with it) is created on the first task, in the
pool child: the Celery parent process never imports the engine.

Task outcomes, as Flower and ``celery events`` show them: a failure the runner recorded
(``model_load_failed``, ``invalid_params``...) ends the task as FAILURE with
:class:`RenderFailed` (``RenderFailed('model_load_failed', '...')``), an expected exception
(``throws``: logged without a traceback) whose message is acknowledged like any other
(``task_acks_on_failure_or_timeout``), so a failed job is not redelivered. Rendered (finishing
in the background), requeued, skipped, cancelled and lost are successful outcomes: the task
returns that word. The outcome of the finishing part (upload, record) comes after the task
has returned; the job row and the worker log have it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from celery import Celery, Task, signals

from fvb_core.queue import RENDER_TASK
from fvb_core.settings import Settings
from worker.failures import RenderFailed

if TYPE_CHECKING:
    from worker.runner import JobRunner

log = logging.getLogger(__name__)

_runner: JobRunner | None = None
_runner_pid: int | None = None


def get_runner(settings: Settings) -> JobRunner:
    """This process's runner (pipelines, store client, finishing executor), made once."""
    global _runner, _runner_pid
    if _runner is None or _runner_pid != os.getpid():
        from worker.runner import JobRunner

        _runner, _runner_pid = JobRunner(settings), os.getpid()
    return _runner


def register_tasks(app: Celery, settings: Settings) -> None:
    @app.task(
        name=RENDER_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # Acknowledged on failure too (the default, spelled out): a failed job is final.
        acks_on_failure_or_timeout=True,
        throws=(RenderFailed,),
    )
    def render(self: Task, job_id: str) -> str:
        from worker.retries import TRANSIENT_ERRORS

        runner = get_runner(settings)
        try:
            outcome = runner.run(job_id)
        except TRANSIENT_ERRORS as err:
            # Nothing is claimed yet (the runner handles everything after the claim): send the
            # message again later. If even that fails, the reaper re-dispatches the queued job.
            retries = self.request.retries
            delay = min(settings.storage_retry_max_s, settings.storage_retry_base_s * 2**retries)
            log.warning("job %s: claim failed (%s), retry %d in %.1fs", job_id, err, retries, delay)
            raise self.retry(
                exc=err, countdown=delay, max_retries=settings.storage_retry_attempts
            ) from err
        except RenderFailed as err:
            log.info("job %s: failed:%s", job_id, err.code)
            raise
        log.info("job %s: %s", job_id, outcome)
        return outcome


def _drain(**_: object) -> None:
    # Rendered jobs may still be uploading on the finishing thread; a warm shutdown (or a pool
    # child being replaced) waits for them instead of dropping them.
    if _runner is not None and _runner_pid == os.getpid():
        _runner.drain()


signals.worker_process_shutdown.connect(_drain, weak=False)
signals.worker_shutdown.connect(_drain, weak=False)
