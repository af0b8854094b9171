"""``fvb``: run and operate the service.

fvb up [--postgres]          the whole local stack (servers + api + scheduler + worker)
fvb api                      the HTTP API
fvb scheduler                release queued jobs to the workers' queues; the reaper
fvb worker --gpus 0          one GPU worker (or --device cpu)
fvb db upgrade               apply database migrations
fvb keys create --tenant T   create an API key (printed once); keys list, keys revoke ID
fvb bulk submit prompts.jsonl --model M [--seeds 0-3 --name N --set k=v]
                             render a dataset as one batch through the API
fvb bulk status|watch|list|retry-failed|cancel|export ...
                             follow it, and write its manifest (fvb_tools/bulk_cli.py)
fvb submit ...               fvb bulk submit, under its first name

While an ``fvb up`` runs in the data dir (``.fvb``, ``FVB_DATA_DIR``), ``fvb submit``, ``fvb
keys`` and ``fvb db`` use its database, API and dev key (from its ``stack.env``) unless the
environment says otherwise. Every failure a user can fix is one line on stderr: exit 2 for
bad usage or configuration, 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from importlib import metadata
from pathlib import Path

from fvb_tools.bulk_cli import BulkFailure, add_bulk_commands, add_submit_args

#: Commands that act on an existing deployment (and so on a running local stack).
_CLIENT_COMMANDS = ("submit", "bulk", "keys", "db")


class UsageError(ValueError):
    """Bad arguments or configuration: exit 2."""


class RunFailure(RuntimeError):
    """Failed while running, with a message that says why: exit 1."""


class _Interrupted(BaseException):
    """SIGINT/SIGTERM during ``fvb up``'s start-up: stop what has started."""


def version() -> str:
    try:
        return metadata.version("fastvideo-batch")
    except metadata.PackageNotFoundError:
        return "unknown"


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the empty ones (None, off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _DefaultsFormatter(prog, max_help_position=32)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fvb", description="FastVideo Batch service", formatter_class=_formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=_formatter)

    up = command("up", "start the local stack (Ctrl-C or SIGTERM stops it)")
    up.add_argument(
        "--data-dir", type=Path, default=None, help="where servers keep data (FVB_DATA_DIR: .fvb)"
    )
    up.add_argument("--postgres", action="store_true", help="embedded PostgreSQL, not SQLite")
    up.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: GPU if any")
    up.add_argument("--gpus", default=None, help="the worker's GPU group, e.g. 0,1")
    up.add_argument(
        "--api-port",
        type=int,
        default=None,
        help="default: FVB_API_PORT (8000), or a free port when that one is taken",
    )
    up.add_argument(
        "--models-config", type=Path, default=None, help="default: tiny random-weight models"
    )
    up.add_argument("--workers", type=int, default=1, help="worker processes")

    command("api", "serve the HTTP API (FVB_API_HOST:FVB_API_PORT)")
    command("scheduler", "release queued jobs to the workers, and reap lost ones")

    worker = command("worker", "run one worker for a GPU group")
    worker.add_argument("--gpus", default=None, help="GPU ids of the group, e.g. 0 or 0,1")
    worker.add_argument("--device", choices=["cpu", "cuda"], default=None)
    worker.add_argument("--pool", default=None, help="GPU pool (queue gpu.<pool>)")

    db = command("db", "database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply all migrations", formatter_class=_formatter)

    keys = command("keys", "API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser(
        "create", help="create a key (printed once)", formatter_class=_formatter
    )
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default=None, help="a label to recognise the key by")
    create.add_argument(
        "--operator", action="store_true", help="may also read /metrics and the whole fleet"
    )
    create.add_argument(
        "--max-queued",
        type=int,
        default=None,
        help="the tenant's queued-jobs limit while this key is used (default: FVB_MAX_QUEUED_JOBS)",
    )
    listing = keys_commands.add_parser(
        "list", help="every key: id, tenant, prefix, state", formatter_class=_formatter
    )
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    revoke = keys_commands.add_parser(
        "revoke",
        help="revoke a key (it gets 401 from its next request)",
        formatter_class=_formatter,
    )
    revoke.add_argument("key", help="the key's id (key_...) or its prefix (fvb-...)")

    add_submit_args(command("submit", "render a dataset file as one batch (= fvb bulk submit)"))
    add_bulk_commands(
        command("bulk", "bulk dataset generation: submit, follow, retry, export a manifest"),
        _formatter,
    )
    return parser


def _configure_logging() -> None:
    """Long-running commands log INFO lines to stderr (their log file under ``fvb up``), as
    JSON lines unless ``FVB_LOG_FORMAT=text``."""
    from fvb_core import logs
    from fvb_core.settings import get_settings

    logs.configure(logging.INFO, get_settings().log_format, sys.stderr)


def _up(ns: argparse.Namespace) -> int:
    from fvb_core.settings import get_settings
    from fvb_tools.localstack.stack import LocalStack

    settings = get_settings()
    stack = LocalStack(
        data_dir=ns.data_dir or settings.data_dir,
        postgres=ns.postgres,
        device=ns.device,
        gpus=ns.gpus,
        api_port=ns.api_port,
        default_api_port=settings.api_port,
        models_config=ns.models_config,
        workers=ns.workers,
    )
    # Explicit handlers for both signals: a shell that starts us in the background (or
    # nohup) hands SIGINT down as ignored, and Python would keep it ignored.
    stopped = threading.Event()
    starting = True

    def on_signal(signum: int, _frame: object) -> None:
        stopped.set()
        if starting:
            raise _Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            info = stack.start()
        except _Interrupted:
            print("interrupted during start-up; stopped", file=sys.stderr)
            return 130
        starting = False
        try:
            if info.api_port_note:
                print(f"note: {info.api_port_note}", flush=True)
            print(f"API        {info.api_url}")
            print(f"dev key    {info.dev_key}")
            print(f"dashboard  {info.dashboard_url}")
            print(f"broker     {info.broker_url}")
            print(f"S3         {info.s3_endpoint_url}  (bucket fvb-videos)")
            print(f"database   {_display_url(info.database_url)}")
            print(f"data       {info.data_dir}  (logs in {info.data_dir / 'logs'})")
            print(f"env        {info.env_file}  (read by fvb submit / keys; `. {info.env_file}`)")
            print("Ctrl-C stops everything.", flush=True)
            stopped.wait()
        finally:
            print("stopping ...", flush=True)
            stack.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _api() -> int:
    import uvicorn

    from fvb_core.settings import get_settings
    from scheduler.api.app import ConfigurationError, create_app

    settings = get_settings()
    try:
        app = create_app(settings)
    except ConfigurationError as err:
        raise UsageError(str(err)) from None
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_config=None)
    return 0


def _scheduler() -> int:
    from fvb_core.settings import get_settings
    from scheduler.process import run_scheduler

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_scheduler(get_settings(), stop)
    return 0


def _worker(ns: argparse.Namespace) -> int:
    from worker.main import main as worker_main

    argv = []
    if ns.gpus is not None:
        argv += ["--gpus", ns.gpus]
    if ns.device is not None:
        argv += ["--device", ns.device]
    if ns.pool is not None:
        argv += ["--pool", ns.pool]
    return worker_main(argv) or 0


def _db(ns: argparse.Namespace) -> int:
    from fvb_core.db.migrate import upgrade
    from fvb_core.settings import get_settings

    url = get_settings().database_url
    upgrade(url)
    print(f"database at head: {_display_url(url)}")
    return 0


def _keys(ns: argparse.Namespace) -> int:
    from fvb_core.settings import get_settings
    from fvb_tools import keys

    url = get_settings().database_url
    if ns.keys_command == "create":
        if ns.max_queued is not None and ns.max_queued < 1:
            raise UsageError(f"--max-queued must be at least 1, got {ns.max_queued}")
        key = keys.create(
            url, ns.tenant, name=ns.name, operator=ns.operator, max_queued=ns.max_queued
        )
        print(key)
        kind = "operator key" if ns.operator else "key"
        print(f"({kind} of tenant {ns.tenant}; it is shown only now, store it)", file=sys.stderr)
    elif ns.keys_command == "list":
        print(keys.table(keys.listed(url, ns.tenant)))
    else:
        revoked = keys.revoke(url, ns.key)
        print(f"revoked {revoked.id} ({revoked.prefix}..., tenant {revoked.tenant})")
    return 0


def _submit(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk, bulk_cli

    try:
        return bulk_cli.submit(ns)
    except bulk.ApiFailure as err:
        raise RunFailure(str(err)) from None


def _bulk(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk_cli

    return bulk_cli.run(ns)


def _use_running_stack(data_dir: Path) -> None:
    """Fill in what the environment leaves unset from the stack running in ``data_dir``."""
    from fvb_core.settings import get_settings
    from fvb_tools.localstack.data_dir import holder_pid, read_live_env

    values = read_live_env(data_dir)
    if not values:
        return
    for key, value in values.items():
        if not os.environ.get(key):  # set and empty counts as unset (FVB_API_KEY=$UNSET)
            os.environ[key] = value
    get_settings.cache_clear()
    print(f"(using the local stack of {data_dir}, pid {holder_pid(data_dir)})", file=sys.stderr)


def _describe(err: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for a failure a user can act on; None for a real bug."""
    from pydantic import ValidationError
    from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

    from fvb_tools.localstack.data_dir import DataDirInUse
    from fvb_tools.localstack.process import ServiceStartError

    if isinstance(err, ValidationError):  # a ValueError too: first
        problems = "; ".join(
            f"FVB_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in err.errors()
        )
        return 2, f"bad setting: {problems}"
    if isinstance(err, UsageError | ValueError):
        return 2, str(err)
    if isinstance(err, RunFailure | DataDirInUse | BulkFailure):
        return 1, str(err)
    if isinstance(err, ServiceStartError):
        first, _, _ = str(err).partition("\n")
        return 1, f"{first} (its log is under the data dir's logs/)"
    if isinstance(err, OperationalError | ProgrammingError | DBAPIError):
        from fvb_core.settings import get_settings

        url = _display_url(get_settings().database_url)
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0]
        if "no such table" in reason or ("does not exist" in reason and "relation" in reason):
            return 1, f"the database {url} has no tables yet: run `fvb db upgrade` first"
        return 1, f"database {url}: {reason}"
    return None


def main(argv: list[str] | None = None) -> int:
    ns = _build_parser().parse_args(argv)
    handlers = {
        "up": lambda: _up(ns),
        "api": _api,
        "scheduler": _scheduler,
        "worker": lambda: _worker(ns),
        "db": lambda: _db(ns),
        "keys": lambda: _keys(ns),
        "submit": lambda: _submit(ns),
        "bulk": lambda: _bulk(ns),
    }
    try:
        if ns.command in ("api", "scheduler"):
            _configure_logging()
        if ns.command in _CLIENT_COMMANDS:
            from fvb_core.settings import get_settings

            _use_running_stack(get_settings().data_dir)
        return handlers[ns.command]()
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        described = _describe(err)
        if described is None:
            raise
        code, message = described
        print(f"fvb: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
