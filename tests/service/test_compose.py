"""docker-compose.yml is checked without Docker: our services run real `fvb` commands and set
only environment variables that our settings read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scheduler.cli import _build_parser
from scheduler.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
OURS = {name: svc for name, svc in COMPOSE["services"].items() if svc.get("build")}


def test_compose_runs_api_scheduler_worker_and_the_infrastructure():
    assert {"api", "scheduler", "worker", "migrate"} <= set(OURS)
    assert {"valkey", "postgres", "seaweedfs"} <= set(COMPOSE["services"])


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_service_command_is_a_real_fvb_entry_point(name):
    command = OURS[name]["command"]
    assert command[0] == "fvb"
    _build_parser().parse_args(command[1:])  # exits (SystemExit) on an unknown command


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_environment_variable_is_read_by_our_settings(name):
    known = {f"FVB_{field.upper()}" for field in Settings.model_fields}
    environment = OURS[name].get("environment", {})
    assert environment, f"{name} sets no environment"
    unknown = sorted(set(environment) - known)
    assert not unknown, f"{name} sets variables no setting reads: {unknown}"
    # And the values parse: Settings accepts exactly this environment.
    Settings(**{key[4:].lower(): value for key, value in environment.items()})


def test_worker_reserves_an_nvidia_gpu():
    devices = OURS["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_dockerfile_installs_the_service_and_copies_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("fastvideo", "scheduler", "worker", "migrations"):
        assert f"COPY {package} " in dockerfile
    assert ".[service]" in dockerfile
