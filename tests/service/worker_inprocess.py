"""The worker's job path in the test process: ``JobRunner.run(job_id)``, what the Celery task
``fvb.render`` calls, against a real SQLite database and the real S3 store (SeaweedFS), with
no broker and no dispatch (jobs are inserted queued and run by id). Tests can then reach into
the loaded engine, e.g. to count the text encoder's forward passes."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings

TINY = dict(width=32, height=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0, fps=8)


@dataclass
class Engine:
    """A loaded model of a runner, watched: the text encoder's forward passes (the batch
    size of each) and the frames of every video it rendered."""

    generator: Any
    encoder_calls: list[int] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)


@dataclass
class InProcess:
    settings: Settings
    models: dict[str, str]

    def runner(self, **settings: Any):
        from worker.runner import JobRunner

        return JobRunner(self.settings.model_copy(update=settings), worker_id="test:0:cpu")

    def watch(self, runner, model: str) -> Engine:
        """Load ``model`` in ``runner``'s pipeline cache and watch it."""
        generator = runner.pipelines.get(runner._model(model))
        engine = Engine(generator)
        encoder = generator.pipeline.get_module("text_encoder")
        encoder.register_forward_hook(
            lambda module, args, output: engine.encoder_calls.append(int(args[0].shape[0]))
        )
        render: Callable[..., Any] = generator.generate_video

        @functools.wraps(render)
        def generate_video(*args: Any, **kwargs: Any) -> Any:
            result = render(*args, **kwargs)
            engine.videos.append(result.frames.copy())
            return result

        generator.generate_video = generate_video
        return engine

    def submit(self, model: str = "tiny", prompt: str = "a cat", **params: Any) -> str:
        with session_scope(self.settings.database_url) as session:
            job = Job(tenant="acme", model=model, params={"prompt": prompt, **TINY, **params})
            return transitions.create_job(session, job).id

    def row(self, job_id: str) -> Job:
        with session_scope(self.settings.database_url) as session:
            return session.get(Job, job_id)

    def run_all(self, runner, ids: list[str]) -> list[Job]:
        """Render the jobs one after another, wait for their uploads, return their rows."""
        for job_id in ids:
            assert runner.run(job_id) == "rendered"
        runner.drain()
        rows = [self.row(job_id) for job_id in ids]
        for row in rows:
            assert row.status == "succeeded", (row.error_code, row.error_message)
        return rows


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, s3_server, tiny_t2v) -> Iterator[InProcess]:
    tmp = tmp_path_factory.mktemp("worker-in-process")
    models = {"tiny": tiny_t2v}
    config = tmp / "models.toml"
    config.write_text(
        "".join(f'[models."{name}"]\npath = "{path}"\n' for name, path in models.items())
    )
    database_url = f"sqlite:///{tmp / 'fvb.db'}"
    upgrade(database_url)
    settings = Settings(
        database_url=database_url,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        s3_bucket=f"fvb-inproc-{uuid.uuid4().hex[:8]}",
        models_config=config,
        worker_device="cpu",
        heartbeat_interval_s=0.2,
    )
    s3_server.client().create_bucket(Bucket=settings.s3_bucket)
    yield InProcess(settings, models)
