"""``fvb bulk ...`` (and ``fvb submit``, its ``submit`` under the old name): the command
line of bulk dataset generation. The work is in :mod:`fvb_tools.bulk`; this parses the
arguments, shows progress bars and prints one line per outcome.

fvb bulk submit FILE --model M [--seeds 0-3] [--name N] [--set size=832x480 ...]
fvb bulk status N | watch N | list | retry-failed N [--code C] | cancel N
fvb bulk export N --out manifest.parquet [--download DIR --workers 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


class BulkFailure(RuntimeError):
    """A failure at run time the user can act on (exit 1)."""


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=None,
        help="the API's /v1 URL (default: FVB_API_URL, the running `fvb up`, or "
        "FVB_API_HOST/FVB_API_PORT)",
    )
    parser.add_argument(
        "--api-key", default=None, help="default: FVB_API_KEY, or the running `fvb up`'s dev key"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_submit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help=".jsonl, .csv, .parquet or one prompt a line")
    parser.add_argument("--model", default=None, help="for lines that name none")
    parser.add_argument("--seeds", default=None, help="one item per line and seed: 0-3 or 0,5,9")
    parser.add_argument(
        "--name", default=None, help="the batch's name: submitting again under it resumes"
    )
    parser.add_argument("--priority", type=int, default=None, help="for lines that give none")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="FIELD=VALUE",
        help="a video field for lines that give none, e.g. num_inference_steps=30 (repeatable)",
    )
    parser.add_argument(
        "--retention", type=int, default=None, help="seconds to keep a new batch's videos"
    )
    parser.add_argument("--batch-id", default=None, help="resume submitting into this batch")
    parser.add_argument("--wait", action="store_true", help="follow the batch to the end")
    parser.add_argument("--download", type=Path, default=None, help="then save the videos here")
    _client_args(parser)


def add_bulk_commands(parser: argparse.ArgumentParser, formatter) -> None:
    commands = parser.add_subparsers(dest="bulk_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=formatter)

    add_submit_args(command("submit", "submit a dataset file as one batch (resumable by name)"))
    for name, help in (
        ("status", "a batch's counts by state, throughput over the last 10 minutes, ETA"),
        ("watch", "follow a batch live with a progress bar until it is done"),
        ("cancel", "cancel every unfinished video of a batch"),
    ):
        sub = command(name, help)
        sub.add_argument("batch", help="the batch's name or id")
        _client_args(sub)
    _client_args(command("list", "your batches, newest first"))
    retry = command("retry-failed", "queue a batch's failed videos again (same item keys)")
    retry.add_argument("batch", help="the batch's name or id")
    retry.add_argument("--code", default=None, help="only videos that failed with this code")
    _client_args(retry)
    export = command("export", "write a batch's manifest (and download its videos)")
    export.add_argument("batch", help="the batch's name or id")
    export.add_argument("--out", type=Path, required=True, help="manifest.parquet or .jsonl")
    export.add_argument("--download", type=Path, default=None, help="fetch the videos here")
    export.add_argument("--workers", type=int, default=8, help="parallel downloads")
    _client_args(export)


def _client(ns: argparse.Namespace):
    from fvb_core.settings import get_settings
    from fvb_tools import bulk

    settings = get_settings()
    api_url = ns.api_url or settings.api_url
    if api_url is None:
        host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
        api_url = f"http://{host}:{settings.api_port}/v1"
    return bulk.Client(api_url, ns.api_key or settings.api_key)


def _bar(ns: argparse.Namespace, **kwargs):
    from tqdm import tqdm

    kwargs.setdefault("disable", ns.no_progress)
    return tqdm(**kwargs)


def submit(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk

    client = _client(ns)
    seeds = bulk.parse_seeds(ns.seeds)
    sets = bulk.parse_sets(ns.sets)
    if ns.priority is not None:
        sets.setdefault("priority", ns.priority)
    lines = list(bulk.read_dataset(ns.dataset, ns.model, sets))  # parse it all first
    batch = bulk.open_batch(client, ns.dataset, ns.name, ns.batch_id, ns.retention)
    batch_id = batch["id"]
    items = list(bulk.expand(iter(lines), batch.get("name") or batch_id, seeds))
    resume = f"--name {batch['name']}" if batch.get("name") else f"--batch-id {batch_id}"
    print(f"batch {batch_id} (resume with {resume})", flush=True)
    with _bar(ns, total=len(items), desc="submitting", unit="video") as bar:
        outcome = bulk.submit_items(client, batch_id, items, progress=bar)
    print(
        f"batch {batch_id}: {outcome.submitted} videos submitted "
        f"({outcome.created} new, {outcome.existing} already there)",
        flush=True,
    )
    for line, reason in outcome.failed:
        print(f"{ns.dataset}:{line}: {reason}", file=sys.stderr)
    if ns.wait or ns.download is not None:
        with _bar(ns, desc="rendering", unit="video") as bar:
            done = bulk.wait_for_batch(client, batch_id, progress=bar)
        counts = done["request_counts"]
        print(
            f"batch {batch_id} {done['status']}: {counts['completed']} completed, "
            f"{counts['failed']} failed, {counts['cancelled']} cancelled"
        )
    if ns.download is not None:
        written = bulk.download_batch(client, batch_id, ns.download)
        print(f"{len(written)} videos written to {ns.download}")
    return 1 if outcome.failed else 0


def _status(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk

    client = _client(ns)
    batch = bulk.find_batch(client, ns.batch)
    batch = client.request("GET", f"/batches/{batch['id']}")  # with its progress
    print("\n".join(bulk.describe(batch)))
    return 0


def _watch(ns: argparse.Namespace, interval_s: float = 2.0) -> int:
    from fvb_tools import bulk

    client = _client(ns)
    batch_id = bulk.find_batch(client, ns.batch)["id"]
    with _bar(ns, desc="finished", unit="video") as bar:
        while True:
            batch = client.request("GET", f"/batches/{batch_id}")
            counts = batch["request_counts"]
            bar.total = counts["total"]
            bar.update(bulk.finished(counts) - bar.n)
            progress = batch.get("progress") or {}
            bar.set_postfix(failed=counts["failed"], eta=progress.get("eta_seconds"), refresh=False)
            if batch["status"] in ("completed", "cancelled"):
                break
            time.sleep(interval_s)
    print("\n".join(bulk.describe(batch)))
    return 1 if counts["failed"] else 0


def _list(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk

    rows = list(bulk.list_batches(_client(ns)))
    print(f"{'name':<32} {'id':<31} {'status':<11} {'finished':>17} {'failed':>7}")
    for batch in rows:
        counts = batch["request_counts"]
        done = f"{bulk.finished(counts)}/{counts['total']}"
        print(
            f"{(batch.get('name') or '-'):<32} {batch['id']:<31} {batch['status']:<11} "
            f"{done:>17} {counts['failed']:>7}"
        )
    return 0


def _retry_failed(ns: argparse.Namespace) -> int:
    import urllib.parse

    from fvb_tools import bulk

    client = _client(ns)
    batch_id = bulk.find_batch(client, ns.batch)["id"]
    query = f"?code={urllib.parse.quote(ns.code)}" if ns.code else ""
    answer = client.request("POST", f"/batches/{batch_id}/retry_failed{query}")
    print(f"batch {batch_id}: {len(answer['retried'])} failed videos queued again")
    return 0


def _cancel(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk

    client = _client(ns)
    batch_id = bulk.find_batch(client, ns.batch)["id"]
    batch = client.request("POST", f"/batches/{batch_id}/cancel")
    print(f"batch {batch_id}: {batch['status']}")
    return 0


def _export(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk

    client = _client(ns)
    batch = bulk.find_batch(client, ns.batch)
    batch = client.request("GET", f"/batches/{batch['id']}")
    total = batch["request_counts"]["total"]
    with (
        _bar(ns, total=total, desc="manifest", unit="row") as rows,
        _bar(
            ns,
            total=batch["request_counts"]["completed"],
            desc="download",
            unit="video",
            disable=ns.no_progress or ns.download is None,
        ) as downloads,
    ):
        done = bulk.export(
            client, batch["id"], ns.out, ns.download, ns.workers, rows.update, downloads.update
        )
    print(f"{done.rows} rows written to {ns.out}")
    if ns.download is not None:
        print(f"{done.downloaded} videos ({done.bytes} bytes) written to {ns.download}, sha256 ok")
    for video_id, why in done.failed:
        print(f"{video_id}: not downloaded: {why}", file=sys.stderr)
    return 1 if done.failed else 0


def run(ns: argparse.Namespace) -> int:
    from fvb_tools import bulk

    handlers: dict[str, Any] = {
        "submit": submit,
        "status": _status,
        "watch": _watch,
        "list": _list,
        "retry-failed": _retry_failed,
        "cancel": _cancel,
        "export": _export,
    }
    try:
        return handlers[ns.bulk_command](ns)
    except bulk.ApiFailure as err:
        raise BulkFailure(str(err)) from None
