"""What only the worker knows, recorded with a succeeded job (``Job.result``, a
``fvb_core.jobs.JobResult``): the frames, fps and size it rendered, the model's revision
(``worker.pipeline_cache.model_revision``), the GPU; and the stage timings the bulk manifest
reads. Through ``JobRunner.run``, the Celery task's code path (``worker_inprocess``)."""

from __future__ import annotations

import json
import shutil

import pytest

from fvb_core.jobs import JobResult
from fvb_core.models_config import ServedModel
from worker import pipeline_cache
from worker.pipeline_cache import PipelineCache, model_revision

pytestmark = pytest.mark.timeout(240)

#: Stage timings the manifest reads, besides the engine's own stage names.
MANIFEST_TIMINGS = {"text_encode", "denoise", "decode", "encode", "upload", "generate", "total"}


def test_a_succeeded_job_records_its_result_and_stage_timings(in_process, tiny_t2v):
    runner = in_process.runner()
    job_id = in_process.submit(prompt="a red panda", width=48, height=32, num_frames=9, seed=3)
    (row,) = in_process.run_all(runner, [job_id])
    assert row.result == {
        "frames": 9,
        "fps": 8,
        "width": 48,
        "height": 32,
        "model_revision": model_revision(tiny_t2v),
        "gpu_name": "cpu",
    }
    assert JobResult.from_json(row.result).to_json() == row.result
    assert set(row.stage_timings) >= MANIFEST_TIMINGS, row.stage_timings
    for name in ("text_encode", "denoise", "decode", "encode", "upload"):
        assert row.stage_timings[name] > 0, name
    timings = row.stage_timings
    assert timings["denoise"] == timings["denoising_stage"]
    assert timings["decode"] == timings["decoding_stage"]
    assert timings["encode"] == pytest.approx(timings["mp4_encode"] + timings["previews"], abs=2e-4)


def test_model_revision_hashes_the_configs_not_the_weights(tiny_t2v, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_t2v, folder)
    revision = model_revision(folder)
    assert len(revision) == 16 and int(revision, 16) >= 0
    assert revision == model_revision(tiny_t2v)  # the content counts, not where it is

    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    assert model_revision(folder) == revision

    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_layers": config["num_layers"] + 1}))
    changed = model_revision(folder)
    assert changed != revision
    scheduler = next((folder / "scheduler").glob("*.json"))
    scheduler.write_text(scheduler.read_text().replace("}", ', "shift": 7.0}', 1))
    assert model_revision(folder) not in (revision, changed)


def test_the_revision_is_computed_once_per_loaded_model(tiny_t2v, monkeypatch):
    computed = []

    def counting(path):
        computed.append(path)
        return model_revision(path)

    monkeypatch.setattr(pipeline_cache, "model_revision", counting)
    cache = PipelineCache(size=1, device="cpu")
    model = ServedModel(name="t2v", path=tiny_t2v)
    cache.get(model)
    for _ in range(3):
        cache.get(model)
        assert cache.revision(model) == model_revision(tiny_t2v)
    assert len(computed) == 1
    cache.get(ServedModel(name="other", path=tiny_t2v))  # evicts t2v (size 1)
    cache.get(model)  # loaded again: computed again
    assert len(computed) == 3
    cache.close()
