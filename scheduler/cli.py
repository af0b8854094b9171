"""``fvb``: run and operate the service.

fvb up [--postgres]          the whole local stack (servers + api + scheduler + worker)
fvb api                      the HTTP API
fvb scheduler                the reaper / re-dispatcher loop
fvb worker --gpus 0          one GPU worker (or --device cpu)
fvb db upgrade               apply database migrations
fvb keys create --tenant T   create an API key (printed once)
fvb submit prompts.jsonl --model M [--wait --download DIR]
                             render a dataset as one batch through the API
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvb", description="FastVideo Batch service")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the local stack (Ctrl-C stops it)")
    up.add_argument("--data-dir", type=Path, default=Path(".fvb"))
    up.add_argument("--postgres", action="store_true", help="embedded PostgreSQL, not SQLite")
    up.add_argument("--device", choices=["cpu", "cuda"], default=None)
    up.add_argument("--gpus", default=None, help="the worker's GPU group, e.g. 0,1")
    up.add_argument("--api-port", type=int, default=None)
    up.add_argument("--models-config", type=Path, default=None)
    up.add_argument("--workers", type=int, default=1)

    commands.add_parser("api", help="serve the HTTP API (FVB_API_HOST:FVB_API_PORT)")
    commands.add_parser("scheduler", help="run the reaper and re-dispatcher")

    worker = commands.add_parser("worker", help="run one worker for a GPU group")
    worker.add_argument("--gpus", default=None, help="GPU ids of the group, e.g. 0 or 0,1")
    worker.add_argument("--device", choices=["cpu", "cuda"], default=None)
    worker.add_argument("--pool", default=None, help="GPU pool (queue gpu.<pool>)")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply all migrations")

    keys = commands.add_parser("keys", help="API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default=None)

    submit = commands.add_parser(
        "submit", help="render a dataset (.jsonl bodies or one prompt per line) as one batch"
    )
    submit.add_argument("dataset", type=Path)
    submit.add_argument("--model", default=None, help="for lines that name none")
    submit.add_argument(
        "--api-url", default=None, help="the API's /v1 URL (default: FVB_API_HOST/FVB_API_PORT)"
    )
    submit.add_argument("--api-key", default=None, help="default: $FVB_API_KEY")
    submit.add_argument("--batch-id", default=None, help="resume submitting into this batch")
    submit.add_argument("--wait", action="store_true", help="follow the batch to the end")
    submit.add_argument("--download", type=Path, default=None, help="then save the videos here")
    submit.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _up(ns: argparse.Namespace) -> int:
    from scheduler.localstack.stack import LocalStack

    stack = LocalStack(
        data_dir=ns.data_dir,
        postgres=ns.postgres,
        device=ns.device,
        gpus=ns.gpus,
        api_port=ns.api_port,
        models_config=ns.models_config,
        workers=ns.workers,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    info = stack.start()
    try:
        print(f"API        {info.api_url}")
        print(f"dev key    {info.dev_key}")
        print(f"dashboard  {info.dashboard_url}")
        print(f"data       {info.data_dir}  (logs in {info.data_dir / 'logs'})")
        print("Ctrl-C stops everything.", flush=True)
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


def _api() -> int:
    import uvicorn

    from scheduler.api.app import create_app
    from scheduler.settings import get_settings

    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port)
    return 0


def _scheduler() -> int:
    from scheduler.reaper import run_reaper
    from scheduler.settings import get_settings

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        run_reaper(get_settings(), stop)
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
    from scheduler.db.migrate import upgrade
    from scheduler.settings import get_settings

    url = get_settings().database_url
    upgrade(url)
    print(f"database at head: {url.split('@')[-1]}")
    return 0


def _keys(ns: argparse.Namespace) -> int:
    from scheduler.api.auth import create_api_key
    from scheduler.db.session import session_scope
    from scheduler.settings import get_settings

    with session_scope(get_settings().database_url) as session:
        key = create_api_key(session, ns.tenant, name=ns.name)
    print(key)
    print(f"(tenant {ns.tenant}; the key is shown only now, store it)", file=sys.stderr)
    return 0


def _submit(ns: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from scheduler import bulk
    from scheduler.settings import get_settings

    api_url = ns.api_url
    if api_url is None:
        settings = get_settings()
        host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
        api_url = f"http://{host}:{settings.api_port}/v1"
    client = bulk.Client(api_url, ns.api_key or os.environ.get("FVB_API_KEY"))
    batch_id = ns.batch_id
    try:
        total = sum(1 for _ in bulk.read_dataset(ns.dataset, ns.model))  # parse it all first
        if batch_id is None:
            batch_id = bulk.create_batch(client, ns.dataset)
        print(f"batch {batch_id} (resume with --batch-id {batch_id})", flush=True)
        with tqdm(total=total, desc="submitting", unit="video", disable=ns.no_progress) as bar:
            outcome = bulk.submit_dataset(client, ns.dataset, ns.model, batch_id, progress=bar)
        print(f"batch {batch_id}: {outcome.submitted} videos submitted", flush=True)
        for line, message in outcome.failed:
            print(f"{ns.dataset}:{line}: rejected: {message}", file=sys.stderr)
        if ns.wait or ns.download is not None:
            with tqdm(desc="rendering", unit="video", disable=ns.no_progress) as bar:
                batch = bulk.wait_for_batch(client, batch_id, progress=bar)
            counts = batch["request_counts"]
            print(
                f"batch {batch_id} {batch['status']}: {counts['completed']} completed, "
                f"{counts['failed']} failed, {counts['cancelled']} cancelled"
            )
        if ns.download is not None:
            written = bulk.download_batch(client, batch_id, ns.download)
            print(f"{len(written)} videos written to {ns.download}")
    except bulk.ApiFailure as err:
        print(f"fvb: error: {err}", file=sys.stderr)
        return 1
    return 1 if outcome.failed else 0


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
    }
    try:
        return handlers[ns.command]()
    except ValueError as err:
        print(f"fvb: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
