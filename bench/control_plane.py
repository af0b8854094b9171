"""The control plane at scale, on the real local stack (Valkey, SeaweedFS, SQLite or an
embedded PostgreSQL, the API and the scheduler as processes; no GPU worker):

1. ``fvb submit`` of N lines (``fvb_tools.bulk.submit_dataset``, the code the CLI runs)
   against the running API: total time, and the rate per tenth of the file (flat, or not,
   as the backlog grows).
2. A reaper pass and a release choice with N jobs queued.
3. The scheduler process releasing the N queued jobs to one consumer that takes each
   message at once: it pops what the queue holds and marks those jobs done in one UPDATE
   (a stand-in for workers that finish at once, cheap so that the scheduler is what is
   measured; a real worker claims and finishes through ``transitions``). Releases per
   second, and the most messages the pool's queue ever held, against the bound.

    python -m bench.control_plane --db sqlite --lines 10000
    python -m bench.control_plane --db postgres --lines 100000
    python -m bench.control_plane --smoke      # 300 lines, for the test suite
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import redis
from sqlalchemy import func, select, update

from fvb_core.db import fleet
from fvb_core.db.models import Job, JobEvent, utcnow
from fvb_core.db.session import session_scope
from fvb_core.models_config import load_models_config
from fvb_core.settings import Settings
from fvb_tools import bulk
from fvb_tools.localstack.stack import LocalStack
from scheduler.reaper import reap
from scheduler.release import choose

MODEL = "tiny-wan-t2v"


class Ticks:
    """A tqdm stand-in that records (time, lines done)."""

    def __init__(self) -> None:
        self.n = 0
        self.marks: list[tuple[float, int]] = [(time.perf_counter(), 0)]

    def update(self, count: int) -> None:
        self.n += count
        self.marks.append((time.perf_counter(), self.n))


def tenths(ticks: Ticks, total: int) -> list[float]:
    """Lines per second over each tenth of the file."""
    rates, start_t, start_n = [], *ticks.marks[0]
    step = max(1, total // 10)
    goal = step
    for moment, done in ticks.marks[1:]:
        if done >= goal:
            rates.append((done - start_n) / (moment - start_t))
            start_t, start_n, goal = moment, done, done + step
    return rates


def submit(info, lines: int, folder: Path) -> dict:
    dataset = folder / "prompts.jsonl"
    with dataset.open("w") as out:
        for i in range(lines):
            out.write(json.dumps({"prompt": f"shot {i}", "size": "64x64", "seed": i}) + "\n")
    client = bulk.Client(info.api_url, info.dev_key, timeout_s=300)
    ticks = Ticks()
    started = time.perf_counter()
    outcome = bulk.submit_dataset(client, dataset, MODEL, progress=ticks)
    seconds = time.perf_counter() - started
    assert outcome.created == lines and not outcome.failed, outcome
    rates = tenths(ticks, lines)
    return {
        "lines": lines,
        "seconds": round(seconds, 2),
        "lines_per_s": round(lines / seconds, 1),
        "per_tenth_lines_per_s": [round(r) for r in rates],
        "batch": outcome.batch_id,
    }


def passes(settings: Settings, pool: str) -> dict:
    started = time.perf_counter()
    reap(settings)
    reap_s = time.perf_counter() - started
    with session_scope(settings.database_url) as session:
        started = time.perf_counter()
        chosen = choose(session, pool, 64)
        choose_s = time.perf_counter() - started
        session.rollback()  # a measurement: release nothing
    return {
        "reaper_pass_s": round(reap_s, 4),
        "choose_64_s": round(choose_s, 4),
        "chosen": len(chosen),
    }


def consume(settings: Settings, pool: str, total: int, bound: int) -> dict:
    """One consumer that takes every message at once; releases/s and the queue's peak."""
    broker = redis.Redis.from_url(settings.broker_url)
    queue = f"gpu.{pool}"
    keys = [queue] + [f"{queue}\x06\x16{level}" for level in range(1, 10)]
    worker_id = f"bench-consumer@{pool}"
    with session_scope(settings.database_url) as session:
        fleet.register_worker(session, worker_id, pool, 1, "bench", os.getpid())
    peak = 0
    done = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            with broker.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                peak = max(peak, sum(pipe.execute()))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    last_beat = 0.0
    while done < total:
        with broker.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.lrange(key, 0, -1)
                pipe.delete(key)
            raws = [raw for i, got in enumerate(pipe.execute()) if i % 2 == 0 for raw in got]
        if not raws:
            time.sleep(0.001)
        else:
            ids = [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in raws]
            with session_scope(settings.database_url) as session:
                taken = session.execute(
                    update(Job)
                    .where(Job.id.in_(ids), Job.status + "" == "queued")  # by id, not status
                    .values(
                        status="succeeded",
                        attempt=Job.attempt + 1,
                        worker_id=worker_id,
                        finished_at=utcnow(),
                    )
                )
                done += taken.rowcount
        if time.perf_counter() - last_beat > 1:
            with session_scope(settings.database_url) as session:
                fleet.beat_worker(session, worker_id)
            last_beat = time.perf_counter()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    with session_scope(settings.database_url) as session:
        releases = session.execute(
            select(func.count()).select_from(JobEvent).where(JobEvent.detail.startswith("released"))
        ).scalar_one()
        finished = session.execute(
            select(func.count()).select_from(Job).where(Job.status == "succeeded")
        ).scalar_one()
    broker.close()
    return {
        "released": total,
        "release_events": releases,
        "taken": finished,
        "seconds": round(seconds, 2),
        "releases_per_s": round(total / seconds, 1),
        "queue_peak": peak,
        "bound": bound,
    }


def run(db: str, lines: int, per_worker: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fvb-bench-") as tmp:
        folder = Path(tmp)
        stack = LocalStack(
            data_dir=folder / "stack",
            postgres=db == "postgres",
            device="cpu",
            workers=0,
            extra_env={
                "FVB_RELEASE_PER_WORKER": str(per_worker),
                "FVB_RELEASE_INTERVAL_S": "0.02",
                "FVB_MAX_QUEUED_JOBS": str(max(lines, 100_000)),
            },
        )
        with stack as info:
            settings = Settings(
                database_url=info.database_url,
                broker_url=info.broker_url,
                models_config=info.models_config,
            )
            pool = load_models_config(info.models_config)[MODEL].pool
            result = {"db": db, "submit": submit(info, lines, folder)}
            result["with_backlog"] = passes(settings, pool)
            result["release"] = consume(settings, pool, lines, per_worker)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--per-worker", type=int, default=64, help="release bound per consumer")
    parser.add_argument("--smoke", action="store_true", help="300 lines (CPU test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = parser.parse_args(argv)
    lines = 300 if ns.smoke else ns.lines
    result = run(ns.db, lines, ns.per_worker)
    print(json.dumps(result, indent=2))
    if ns.json is not None:
        ns.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
