"""The `fvb` command as an operator uses it: migrate, keys, `fvb up` and the README's commands
right after it, one-line errors, and stopping (Ctrl-C however it was started, SIGTERM,
and a SIGKILL that must take every child with it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, inspect

from fvb_tools.localstack.process import die_with_parent

FVB = [sys.executable, "-m", "fvb_tools.cli"]
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def fvb(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [*FVB, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=die_with_parent(),
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("(using")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fvb: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "panic" not in result.stderr
    return lines[0]


def test_db_upgrade_then_keys_create_gives_a_key_the_api_accepts(tmp_path):
    from fastapi.testclient import TestClient

    from fvb_core.models_config import write_models_config
    from fvb_core.settings import Settings
    from scheduler.api.app import create_app

    url = f"sqlite:///{tmp_path / 'fvb.db'}"
    env = {"FVB_DATABASE_URL": url, "FVB_DATA_DIR": str(tmp_path / "no-stack")}
    upgraded = fvb("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert {"jobs", "job_events", "api_keys"} <= set(inspect(create_engine(url)).get_table_names())

    created = fvb("keys", "create", "--tenant", "acme", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("fvb-") and "shown only now" in created.stderr

    models = tmp_path / "models.toml"
    from fastvideo.testing.tiny_wan import save_tiny_wan

    write_models_config(models, {"tiny": {"path": save_tiny_wan(tmp_path / "tiny")}})
    settings = Settings(
        database_url=url,
        models_config=models,
        broker_url="redis://127.0.0.1:1/0",
        s3_endpoint_url="http://127.0.0.1:1",
    )
    client = TestClient(create_app(settings))
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert (
        client.get("/v1/models", headers={"Authorization": "Bearer fvb-wrong"}).status_code == 401
    )

    # Revoked: refused from the very next request; the list shows what happened.
    listed = fvb("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(
        rf"^key_\w+\s+acme\s+{re.escape(key[:12])}\s+tenant\s.*\blive\b", listed.stdout, re.M
    )
    revoked = fvb("keys", "revoke", key[:12], env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked key_" in revoked.stdout
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert "revoked 20" in fvb("keys", "list", "--tenant", "acme", env=env).stdout
    assert_one_line_error(fvb("keys", "revoke", key[:12], env=env), 2, "already revoked")
    assert_one_line_error(fvb("keys", "revoke", "fvb-nothing", env=env), 2, "matches no key")

    operator = fvb("keys", "create", "--tenant", "ops", "--operator", env=env)
    assert "operator key" in operator.stderr
    ops = {"Authorization": f"Bearer {operator.stdout.strip()}"}
    assert client.get("/metrics", headers=ops).status_code == 200


def test_errors_a_new_user_hits_first_are_one_line(tmp_path):
    fresh = {"FVB_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}", "FVB_DATA_DIR": str(tmp_path)}
    assert_one_line_error(
        fvb("keys", "create", "--tenant", "acme", env=fresh), 1, "no tables", "fvb db upgrade"
    )
    missing = {**fresh, "FVB_MODELS_CONFIG": str(tmp_path / "models.toml")}
    assert_one_line_error(fvb("api", env=missing), 2, "models.toml does not exist")
    assert_one_line_error(fvb("scheduler", env=missing), 2, "models.toml does not exist")
    assert_one_line_error(
        fvb("keys", "list", env={**fresh, "FVB_API_PORT": "eighty"}), 2, "FVB_API_PORT"
    )


def test_version_and_help_show_defaults():
    version = fvb("--version")
    assert version.returncode == 0 and re.fullmatch(r"fvb \d+\.\d+\.\d+\S*\n", version.stdout)
    up = fvb("up", "--help")
    assert re.search(r"--workers WORKERS\s+worker processes \(default: 1\)", up.stdout), up.stdout
    assert "FVB_API_PORT (8000)" in up.stdout
    assert "(default: None)" not in fvb("submit", "--help").stdout


def test_scheduler_logs_its_info_lines(tmp_path, tiny_t2v):
    from fvb_core.db.migrate import upgrade
    from fvb_core.models_config import write_models_config

    url = f"sqlite:///{tmp_path / 'fvb.db'}"
    upgrade(url)
    models = tmp_path / "models.toml"
    write_models_config(models, {"tiny": {"path": tiny_t2v}})
    process = subprocess.Popen(
        [*FVB, "scheduler"],
        env={
            **os.environ,
            "FVB_DATABASE_URL": url,
            "FVB_MODELS_CONFIG": str(models),
            "FVB_BROKER_URL": "redis://127.0.0.1:1/0",
        },
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent(),
    )
    try:
        line = process.stderr.readline()
        record = json.loads(line)  # JSON lines (fvb_core/logs.py)
        assert (record["level"], record["name"]) == ("INFO", "scheduler.process"), line
        assert record["message"].startswith("scheduler started: pools default"), line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


# -- fvb up ------------------------------------------------------------------------------------


@dataclass
class Up:
    process: subprocess.Popen
    output: str
    cwd: Path

    def line(self, label: str) -> str:
        match = re.search(rf"^{label}\s+(\S+)", self.output, re.M)
        assert match, self.output
        return match.group(1)

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def _background_shell_child() -> None:
    # What a shell does to a command it starts in the background (`cmd &`), and nohup's
    # neighbour: the child inherits SIGINT as ignored, across exec.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _dies_with_this_test()


_dies_with_this_test = die_with_parent()


@contextlib.contextmanager
def fvb_up(cwd: Path, *args: str, env: dict | None = None, **popen) -> Iterator[Up]:
    """``fvb up`` in ``cwd`` until its banner is out; whatever it started is killed at the
    end, however the test went."""
    popen.setdefault("preexec_fn", die_with_parent())  # a killed test takes fvb up along
    process = subprocess.Popen(
        [*FVB, "up", "--device", "cpu", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )
    seen: list[psutil.Process] = []
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        up = Up(process, "".join(lines), cwd)
        assert "Ctrl-C stops everything" in up.output, up.output
        seen = up.tree()
        yield up
    finally:
        with contextlib.suppress(psutil.Error):
            seen += psutil.Process(process.pid).children(recursive=True)
        if process.poll() is None:
            process.kill()
        process.wait()
        for child in seen:
            with contextlib.suppress(psutil.Error):
                child.kill()


def readme_bulk_lines() -> list[str]:
    """The ``fvb bulk`` commands of the README's bulk example, comments cut."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("Bulk datasets:") :].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    assert len(lines) == 3 and all(line.startswith("fvb bulk ") for line in lines), lines
    return lines


def _get(url: str, key: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_readme_commands_work_right_after_fvb_up_and_ctrl_c_stops_it_from_a_background_shell(
    tmp_path,
):
    # The default port is taken (another service, or another `fvb up`): fvb up says so and
    # moves; the README's next command still finds it, through the data dir.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with fvb_up(
            tmp_path, env={"FVB_API_PORT": str(port)}, preexec_fn=_background_shell_child
        ) as up:
            assert f"note: port {port} is in use" in up.output
            api, key = up.line("API"), up.line("dev key")
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", api) and f":{port}/" not in api
            assert up.line("broker").startswith("redis://127.0.0.1:")
            assert up.line("S3").startswith("http://127.0.0.1:")
            assert re.search(
                r"^dashboard\s+http://127\.0\.0\.1:\d+/dashboard#key=fvb-", up.output, re.M
            )
            assert b"tiny-wan-t2v" in _get(f"{api}/models", key)

            # The README's bulk lines as written (comments cut), with DEV_KEY unset in this
            # shell: the data dir supplies it.
            shutil.copytree(REPO / "examples", tmp_path / "examples")
            env = {"FVB_API_KEY": "", "FVB_API_PORT": str(port)}
            for line in readme_bulk_lines():
                done = fvb(*shlex.split(line)[1:], cwd=tmp_path, env=env, timeout=300)
                assert done.returncode == 0, (line, done.stdout, done.stderr)
                if " submit " in line:
                    assert "6 videos submitted (6 new, 0 already there)" in done.stdout
            manifest = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
            assert len(manifest) == 6 and {r["status"] for r in manifest} == {"completed"}
            assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == sorted(
                Path(r["local_path"]).name for r in manifest
            )
            # `fvb submit`, the old name, resumes the same batch by its id.
            batch = manifest[0]["batch_id"]
            again = fvb(
                "submit",
                "examples/prompts.jsonl",
                "--model",
                "tiny-wan-t2v",
                "--seeds",
                "0-1",
                "--set",
                "num_inference_steps=4",
                "--batch-id",
                batch,
                "--no-progress",
                cwd=tmp_path,
                env={"FVB_API_KEY": key},
            )
            assert again.returncode == 0, again.stderr
            assert "6 videos submitted (0 new, 6 already there)" in again.stdout

            # A second `fvb up` on the same data dir: one line naming the owner.
            second = fvb("up", "--device", "cpu", cwd=tmp_path)
            assert_one_line_error(second, 1, f"in use by pid {up.process.pid}")

            children = up.tree()
            assert len(children) >= 6, [c.cmdline() for c in children]
            up.process.send_signal(signal.SIGINT)
            assert up.process.wait(timeout=60) == 0
            _gone, alive = psutil.wait_procs(children, timeout=10)
            assert not alive, [p.cmdline() for p in alive]
            assert not (tmp_path / ".fvb" / "stack.env").exists()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_fvb_up_stopped_or_killed_leaves_no_child_behind(tmp_path, how):
    with fvb_up(tmp_path, "--data-dir", str(tmp_path / "stack")) as up:
        children = up.tree()
        assert len(children) >= 6, [c.cmdline() for c in children]
        up.process.send_signal(getattr(signal, how))
        up.process.wait(timeout=60)
        # SIGKILL gives fvb up no chance to stop anything: each child must go by itself.
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    # And the data dir is free for the next start.
    from fvb_tools.localstack.data_dir import holder_pid

    assert holder_pid(tmp_path / "stack") is None
