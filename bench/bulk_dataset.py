"""Bulk dataset generation at scale, on the real local stack (Valkey, SeaweedFS, SQLite or an
embedded PostgreSQL, the API and the scheduler as processes; no GPU worker):

1. ``fvb bulk submit`` of a file of N/2 prompts x 2 seeds = N items, run as the user runs
   it (a subprocess of the ``fvb`` CLI, import time included): wall time and items/s.
2. The same command again (a resumed submit: every item already there).
3. Every item is then marked rendered in one UPDATE (output key, sha256, bytes, the worker's
   result and stage timings: what a real worker writes through ``transitions.succeed``; a
   stand-in, so that the manifest is what is measured), and ``fvb bulk export`` writes the
   N-row manifest as Parquet and as JSONL (a subprocess again): wall time each.
4. ``GET /v1/batches/{id}`` (counts, progress, ETA) for the N-item batch: median and p95 of
   50 requests on one keep-alive connection; and the first page of ``/items``.

    python -m bench.bulk_dataset --db sqlite --items 10000
    python -m bench.bulk_dataset --db postgres --items 100000
    python -m bench.bulk_dataset --smoke      # 200 items, for the test suite
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
from sqlalchemy import literal, update

from fvb_core.db.models import Job, utcnow
from fvb_core.db.session import session_scope
from fvb_tools.localstack.stack import LocalStack

MODEL = "tiny-wan-t2v"
NAME = "bench-dataset"


def fvb(info, *args: str) -> tuple[float, str]:
    """Run ``fvb ARGS`` against the stack; (wall seconds, stdout)."""
    env = {**os.environ, "FVB_API_URL": info.api_url, "FVB_API_KEY": info.dev_key}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fvb_tools.cli", *args, "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"fvb {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return seconds, proc.stdout


def write_dataset(path: Path, prompts: int) -> None:
    with path.open("w") as out:
        for i in range(prompts):
            out.write(json.dumps({"prompt": f"shot {i}: a slow pan over a harbour at dusk"}) + "\n")


def batch_id_of(stdout: str) -> str:
    return stdout.split()[1]


def mark_rendered(database_url: str, batch_id: str) -> float:
    """Every item of the batch as a worker leaves it (one UPDATE: a bench stand-in)."""
    started = time.perf_counter()
    now = utcnow()
    result = {"frames": 9, "fps": 8, "width": 64, "height": 64, "model_revision": "0" * 16}
    timings = {"text_encode": 0.01, "generate": 1.2, "encode": 0.05, "upload": 0.02}
    with session_scope(database_url) as session:
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id)
            .values(
                status="succeeded",
                attempt=1,
                progress=100,
                started_at=now,
                finished_at=now,
                worker_id="bench-worker",
                output_key=literal("videos/") + Job.id + literal("/attempt-1.mp4"),
                output_bytes=123_456,
                output_sha256="ab" * 32,
                result={**result, "gpu_name": "NVIDIA H200"},
                stage_timings=timings,
            )
        )
    return time.perf_counter() - started


def get_latency(api_url: str, key: str, path: str, count: int = 50) -> dict:
    parts = urlsplit(api_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"authorization": f"Bearer {key}"}
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        conn.request("GET", parts.path + path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        seconds.append(time.perf_counter() - started)
        assert response.status == 200, body[:500]
    conn.close()
    ms = sorted(s * 1000 for s in seconds)
    return {
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
        "bytes": len(body),
    }


def run(db: str, items: int) -> dict:
    prompts = items // 2
    with tempfile.TemporaryDirectory(prefix="fvb-bench-") as tmp:
        folder = Path(tmp)
        dataset = folder / "prompts.jsonl"
        write_dataset(dataset, prompts)
        stack = LocalStack(
            data_dir=folder / "stack",
            postgres=db == "postgres",
            device="cpu",
            workers=0,
            extra_env={"FVB_MAX_QUEUED_JOBS": str(max(items, 100_000))},
        )
        with stack as info:
            submit = ["bulk", "submit", str(dataset), "--model", MODEL, "--seeds", "0-1"]
            submit += ["--name", NAME, "--set", "size=64x64", "--set", "seconds=1"]
            seconds, out = fvb(info, *submit)
            assert f"{items} videos submitted ({items} new" in out, out
            batch_id = batch_id_of(out)
            again, out = fvb(info, *submit)
            assert f"(0 new, {items} already there)" in out, out
            marked = mark_rendered(info.database_url, batch_id)
            export = {}
            for suffix in ("parquet", "jsonl"):
                manifest = folder / f"manifest.{suffix}"
                export[f"{suffix}_s"] = round(fvb(info, "bulk", "export", NAME, "--out",
                                                  str(manifest))[0], 2)  # fmt: skip
                export[f"{suffix}_mib"] = round(manifest.stat().st_size / 2**20, 1)
            table = pq.read_table(folder / "manifest.parquet")
            assert table.num_rows == items, table.num_rows
            assert set(table.column("status").to_pylist()) == {"completed"}
            return {
                "db": db,
                "items": items,
                "submit": {"seconds": round(seconds, 2), "items_per_s": round(items / seconds)},
                "resubmit": {"seconds": round(again, 2), "items_per_s": round(items / again)},
                "mark_rendered_s": round(marked, 2),
                "export": export,
                "get_batch": get_latency(info.api_url, info.dev_key, f"/batches/{batch_id}"),
                "items_page": get_latency(
                    info.api_url, info.dev_key, f"/batches/{batch_id}/items?limit=100", 20
                ),
            }


def table(result: dict) -> str:
    r = result
    return "\n".join(
        [
            "| db | items | submit s (items/s) | resubmit s | export parquet s | export jsonl s "
            "| GET batch median / p95 ms | items page median ms |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['db']} | {r['items']} | {r['submit']['seconds']} ({r['submit']['items_per_s']})"
            f" | {r['resubmit']['seconds']} | {r['export']['parquet_s']} | "
            f"{r['export']['jsonl_s']} | {r['get_batch']['median_ms']} / "
            f"{r['get_batch']['p95_ms']} | {r['items_page']['median_ms']} |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--items", type=int, default=10_000, help="even: prompts x 2 seeds")
    parser.add_argument("--smoke", action="store_true", help="200 items (CPU test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = parser.parse_args(argv)
    result = run(ns.db, 200 if ns.smoke else ns.items)
    print(json.dumps(result, indent=2))
    print(table(result))
    if ns.json is not None:
        ns.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
