"""The seed guide ("Adding a New Pipeline"), followed literally by a user.

The user's pipeline folder is dropped into a copy of the ``fastvideo`` package and found by
the registry with no other change; a pipeline in a separately installed package is found
through the ``fastvideo.pipelines`` entry-point group. Both run in fresh interpreters so the
registry really scans from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import fastvideo

# The guide's code, as a user pastes it. Two additions a user must make: the guide's
# annotation uses ``List`` without importing it, and its custom stage reads
# ``batch.some_attribute``, which we point at a real field (the prompt embeddings).
GUIDE_PIPELINE = '''
from typing import List

from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.stages import (
    InputValidationStage, CLIPTextEncodingStage, TimestepPreparationStage,
    LatentPreparationStage, DenoisingStage, DecodingStage
)
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
import torch


class MyCustomStage(PipelineStage):
    """Custom processing stage for the pipeline."""

    def __init__(self, custom_module, other_param=None):
        super().__init__()
        self.custom_module = custom_module
        self.other_param = other_param

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        # Access input data
        input_data = batch.prompt_embeds

        # Validate inputs
        if input_data is None:
            raise ValueError("Required input is missing")

        # Process with your module
        result = self.custom_module(input_data)

        # Update batch with results
        batch.some_output = result

        return batch


class MyCustomPipeline(ComposedPipelineBase):
    """Custom diffusion pipeline implementation."""

    # Define required model components from model_index.json
    _required_config_modules = [
        "text_encoder", "tokenizer", "vae", "transformer", "scheduler"
    ]

    @property
    def required_config_modules(self) -> List[str]:
        return self._required_config_modules

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs):
        """Initialize pipeline-specific components."""
        self.modules["custom_module"] = torch.nn.Identity()

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs):
        """Set up pipeline stages with proper dependency injection."""
        self.add_stage(
            stage_name="input_validation_stage",
            stage=InputValidationStage()
        )

        self.add_stage(
            stage_name="prompt_encoding_stage",
            stage=CLIPTextEncodingStage(
                text_encoder=self.get_module("text_encoder"),
                tokenizer=self.get_module("tokenizer")
            )
        )

        self.add_stage(
            stage_name="my_custom_stage",
            stage=MyCustomStage(
                custom_module=self.get_module("custom_module"),
                other_param="some_value"
            )
        )

        self.add_stage(
            stage_name="timestep_preparation_stage",
            stage=TimestepPreparationStage(
                scheduler=self.get_module("scheduler")
            )
        )

        self.add_stage(
            stage_name="latent_preparation_stage",
            stage=LatentPreparationStage(
                scheduler=self.get_module("scheduler"),
                vae=self.get_module("vae")
            )
        )

        self.add_stage(
            stage_name="denoising_stage",
            stage=DenoisingStage(
                transformer=self.get_module("transformer"),
                scheduler=self.get_module("scheduler")
            )
        )

        self.add_stage(
            stage_name="decoding_stage",
            stage=DecodingStage(
                vae=self.get_module("vae")
            )
        )

# Register the pipeline class
EntryClass = MyCustomPipeline
'''

RUN_PIPELINE = """
import json, sys
import fastvideo
from fastvideo import VideoGenerator
from fastvideo.pipelines.pipeline_registry import pipeline_classes

name, model = sys.argv[1], sys.argv[2]
generator = VideoGenerator.from_pretrained(model, device="cpu", pipeline_class_name=name)
result = generator.generate_video(
    "a red panda", height=32, width=48, num_frames=5, num_inference_steps=2, seed=0
)
print(json.dumps({
    "fastvideo": fastvideo.__file__,
    "pipeline": type(generator.pipeline).__name__,
    "registered": sorted(pipeline_classes()),
    "shape": list(result.frames.shape),
    "stages": list(result.stage_timings),
}))
"""


def _run(pythonpath: Path, name: str, model: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_PIPELINE, name, model],
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath,  # `python -c` puts the working directory first on sys.path
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_guide_pipeline_dropped_into_pipelines_folder_is_found_and_renders(tmp_path, tiny_t2v):
    site = tmp_path / "site"
    package_root = Path(fastvideo.__file__).parent
    shutil.copytree(package_root, site / "fastvideo", ignore=shutil.ignore_patterns("__pycache__"))
    user_folder = site / "fastvideo" / "pipelines" / "your_pipeline"
    user_folder.mkdir()
    (user_folder / "__init__.py").write_text("")
    (user_folder / "your_pipeline.py").write_text(GUIDE_PIPELINE)

    report = _run(site, "MyCustomPipeline", tiny_t2v)

    assert report["fastvideo"].startswith(str(site))  # the copy with the user's folder ran
    assert {"MyCustomPipeline", "WanPipeline", "WanImageToVideoPipeline"} <= set(
        report["registered"]
    )
    assert report["pipeline"] == "MyCustomPipeline"
    assert report["shape"] == [5, 32, 48, 3]
    assert report["stages"] == [
        "input_validation_stage",
        "prompt_encoding_stage",
        "my_custom_stage",
        "timestep_preparation_stage",
        "latent_preparation_stage",
        "denoising_stage",
        "decoding_stage",
    ]


def test_pipeline_from_an_installed_package_is_found_through_its_entry_point(tmp_path, tiny_t2v):
    plugin_root = tmp_path / "plugin"
    package = plugin_root / "my_video_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pipeline.py").write_text(
        textwrap.dedent(
            """
            from fastvideo.pipelines.wan.wan_pipeline import WanPipeline

            class PluginWanPipeline(WanPipeline):
                pass

            EntryClass = [PluginWanPipeline]
            """
        )
    )
    dist_info = plugin_root / "my_video_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: my-video-plugin\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[fastvideo.pipelines]\nplugin = my_video_plugin.pipeline\n"
    )

    report = _run(plugin_root, "PluginWanPipeline", tiny_t2v)

    assert "PluginWanPipeline" in report["registered"]
    assert report["pipeline"] == "PluginWanPipeline"
    assert report["shape"] == [5, 32, 48, 3]
