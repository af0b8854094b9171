"""Shared fixtures: tiny random-weight Wan2.1 pipelines in diffusers format.

Each is written once per test session by diffusers itself (``save_pretrained``), so our
loader reads the very files diffusers would, and diffusers can load them as the reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan

# The repository root, as ``python -m pytest`` from it has it: the tests import ``bench`` and
# ``tests.engine_checks`` (whose rank functions spawned ranks import by name; they inherit
# this path). Appended, so the installed packages keep precedence.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.append(ROOT)

# Two CPU cores in CI: more threads only contend.
torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():
    # Without a GPU, Triton kernels that tests force on run in Triton's interpreter. Set before
    # anything imports triton (torch.compile does): triton reads it once.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory) -> str:
    return str(save_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-t2v", TinyWanConfig()))


@pytest.fixture(scope="session")
def tiny_i2v(tmp_path_factory) -> str:
    config = TinyWanConfig(image_to_video=True)
    return str(save_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-i2v", config))
