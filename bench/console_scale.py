"""The console and /metrics at scale: every dashboard JSON endpoint, ``/metrics`` and the
batch routes with 1,000,000 job rows in PostgreSQL, 100,000 of them in one batch.

The real local stack (embedded PostgreSQL 18, Valkey, SeaweedFS, the API and the scheduler
as processes; no worker). The rows are written with ``INSERT ... SELECT generate_series``
(30 days of history for the dev tenant and two others: 90% completed, 5% failed, 2%
cancelled, the rest queued, about 1,400 finishing each hour; plus one batch of 100,000
items, 60% completed) and the roll-ups filled as the scheduler's fold leaves them (one
``GROUP BY`` here instead of folding a million events); then ``VACUUM ANALYZE``, as a
production database is. Each endpoint: median and p95 of 30 requests on one keep-alive
connection, with the dev key (a tenant) and with an operator key.

    python -m bench.console_scale                 # 1,000,000 rows
    python -m bench.console_scale --smoke         # 5,000 rows (the test suite)
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import create_engine, insert, text

from fvb_core.api_keys import create_api_key
from fvb_core.db import rollup
from fvb_core.db.models import JobMinute
from fvb_core.db.session import session_scope
from fvb_tools.localstack.stack import DEV_TENANT, LocalStack

MODEL = "tiny-wan-t2v"
BATCH = "batch_bench_console_000000000"


def fill(database_url: str, rows: int, batch_items: int) -> float:
    """Write ``rows`` jobs (``batch_items`` of them in one batch) and their roll-ups."""
    started = time.perf_counter()
    history = rows - batch_items
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, tenant, status, params, created_at, updated_at, name) "
                "VALUES (:id, :tenant, 'open', '{}', now(), now(), 'bench-console')"
            ),
            {"id": BATCH, "tenant": DEV_TENANT},
        )
        common = (
            "INSERT INTO jobs (id, tenant, model, params, status, priority, attempt, "
            "max_attempts, progress, cancel_requested, created_at, updated_at, started_at, "
            "finished_at, worker_id, output_key, output_bytes, error_code, pool, work, "
            "batch_id) "
        )
        # History: job g finished (30 days * g / history) ago; statuses by g mod 100.
        conn.execute(
            text(
                common + "SELECT 'video_h' || lpad(g::text, 23, '0'), "
                "(ARRAY[:dev, 'globex', 'initech'])[1 + g % 3], :model, "
                '\'{"prompt": "a slow pan over a harbour at dusk"}\', '
                "CASE WHEN g % 100 < 90 THEN 'succeeded' WHEN g % 100 < 95 THEN 'failed' "
                "WHEN g % 100 < 97 THEN 'cancelled' ELSE 'queued' END, 0, 1, 3, 100, false, "
                "t - interval '40 seconds', t, t - interval '30 seconds', "
                "CASE WHEN g % 100 < 97 THEN t END, 'host:1:0', "
                "'videos/video_h' || g || '/attempt-1.mp4', 123456, "
                "CASE WHEN g % 100 BETWEEN 90 AND 94 THEN 'out_of_memory' END, 'default', 1, "
                "NULL FROM (SELECT g, now() - (interval '30 days') * g / :n AS t "
                "FROM generate_series(1, :n) g) s"
            ),
            {"dev": DEV_TENANT, "model": MODEL, "n": history},
        )
        conn.execute(
            text(
                common + "SELECT 'video_b' || lpad(g::text, 23, '0'), :dev, :model, "
                "'{\"prompt\": \"item\"}', CASE WHEN g % 10 < 6 THEN 'succeeded' "
                "ELSE 'queued' END, -5, 1, 3, 0, false, now() - interval '2 hours', "
                "now(), now() - interval '1 hour', "
                "CASE WHEN g % 10 < 6 THEN now() - (interval '1 hour') * g / :n END, "
                "'host:1:0', NULL, NULL, NULL, 'default', 1, :batch "
                "FROM generate_series(1, :n) g"
            ),
            {"dev": DEV_TENANT, "model": MODEL, "n": batch_items, "batch": BATCH},
        )
        conn.execute(
            text(
                "INSERT INTO job_counts (tenant, model, status, n) SELECT tenant, model, "
                "status, count(*) FROM jobs WHERE deleted_at IS NULL "
                "GROUP BY tenant, model, status"
            )
        )
        conn.execute(
            text(
                "INSERT INTO job_outcomes (tenant, model, outcome, error_code, n, output_bytes) "
                "SELECT tenant, model, CASE status WHEN 'succeeded' THEN 'completed' "
                "ELSE status END, coalesce(error_code, ''), count(*), "
                "coalesce(sum(output_bytes), 0) FROM jobs "
                "WHERE status IN ('succeeded', 'failed', 'cancelled') "
                "GROUP BY tenant, model, status, error_code"
            )
        )
    fill_minutes(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


def fill_minutes(engine) -> None:
    """The minute roll-ups of the last day, as the fold leaves them (older ones are pruned)."""
    minutes: dict[tuple, rollup.Minute] = {}
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT date_trunc('minute', finished_at) AS m, tenant, model, status, "
                "round(extract(epoch FROM started_at - created_at)) AS wait, "
                "round(extract(epoch FROM finished_at - started_at)) AS render, count(*) "
                "FROM jobs WHERE finished_at >= now() - interval '1 day' "
                "AND status IN ('succeeded', 'failed') GROUP BY 1, 2, 3, 4, 5, 6"
            )
        ).all()
        for at, tenant, model, status, wait, render, n in rows:
            minute = minutes.setdefault((at, tenant, model), rollup.Minute())
            if status == "failed":
                minute.failed += n
                continue
            minute.completed += n
            minute.queue_wait[rollup.bucket_of(float(wait))] += n
            minute.render[rollup.bucket_of(float(render))] += n
        conn.execute(
            insert(JobMinute),
            [
                dict(minute=at, tenant=t, model=m, completed=v.completed, failed=v.failed,
                     queue_wait=v.queue_wait, render=v.render)
                for (at, t, m), v in minutes.items()
            ],
        )  # fmt: skip


def latency(api_url: str, key: str, path: str, count: int) -> dict:
    parts = urlsplit(api_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"authorization": f"Bearer {key}"}
    seconds = []
    for _ in range(count + 1):  # the first one warms the connection and caches
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        seconds.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
    conn.close()
    ms = sorted(s * 1000 for s in seconds[1:])
    p95 = ms[int(0.95 * (len(ms) - 1))]
    return {"median_ms": round(statistics.median(ms), 2), "p95_ms": round(p95, 2)}


def endpoints(batch_id: str) -> list[tuple[str, str]]:
    """(who, path): the console's JSON and the routes an operator's board polls."""
    return [
        ("tenant", "/dashboard/data"),
        ("tenant", "/dashboard/data?status=failed"),
        ("tenant", "/dashboard/data?status=queued"),
        ("operator", "/metrics"),
        ("tenant", "/v1/batches"),
        ("tenant", f"/v1/batches/{batch_id}"),
        ("tenant", f"/v1/batches/{batch_id}/items?limit=100"),
        ("tenant", "/v1/videos?limit=50"),
        ("tenant", "/dashboard/jobs"),
        ("tenant", "/dashboard/jobs?state=failed"),
        ("tenant", "/dashboard/jobs?q=harbour"),
        ("tenant", f"/dashboard/jobs?batch_id={batch_id}&state=queued"),
        ("operator", "/dashboard/jobs"),
        ("operator", "/dashboard/jobs?tenant=globex&state=cancelled"),
        ("tenant", "/dashboard/jobs/video_h00000000000000000000003"),
        ("operator", "/dashboard/data"),
        ("tenant", "/dashboard/me"),
        ("tenant", "/dashboard/fleet"),
        ("operator", "/dashboard/fleet"),
    ]


def run(rows: int, batch_items: int, count: int, extra: list[tuple[str, str]]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fvb-bench-") as tmp:
        stack = LocalStack(data_dir=Path(tmp) / "stack", postgres=True, device="cpu", workers=0)
        with stack as info:
            fill_s = fill(info.database_url, rows, batch_items)
            with session_scope(info.database_url) as session:
                ops = create_api_key(session, "ops", name="bench", operator=True)
            base = urlsplit(info.api_url)
            root = f"{base.scheme}://{base.netloc}"
            keys = {"tenant": info.dev_key, "operator": ops}
            results = {}
            for who, path in endpoints(BATCH) + extra:
                try:
                    results[f"{who} {path}"] = latency(root, keys[who], path, count)
                except RuntimeError as err:
                    results[f"{who} {path}"] = {"error": str(err)[:200]}
    return {
        "rows": rows,
        "batch_items": batch_items,
        "fill_s": round(fill_s, 1),
        "endpoints": results,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['rows']:,} job rows ({result['batch_items']:,} in one batch), PostgreSQL",
        "",
        "| endpoint | median ms | p95 ms |",
        "|---|---|---|",
    ]
    for name, figures in result["endpoints"].items():
        if "error" in figures:
            lines.append(f"| {name} | error | {figures['error']} |")
        else:
            lines.append(f"| {name} | {figures['median_ms']} | {figures['p95_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-items", type=int, default=100_000)
    parser.add_argument("--count", type=int, default=30, help="requests per endpoint")
    parser.add_argument(
        "--also", action="append", default=[], metavar="WHO:PATH",
        help="another endpoint, e.g. operator:/dashboard/jobs (repeatable)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="5,000 rows (CPU test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = parser.parse_args(argv)
    rows, items, count = (5000, 500, 3) if ns.smoke else (ns.rows, ns.batch_items, ns.count)
    extra = [tuple(spec.split(":", 1)) for spec in ns.also]
    result = run(rows, items, count, extra)
    print(json.dumps(result, indent=2))
    print(table(result))
    if ns.json is not None:
        ns.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
