"""Fair share in the Redis queue, against the same real servers as test_api (migrated SQLite,
Valkey broker): priority first, then each tenant's jobs drop a level per
``fair_share_step`` of its own queued jobs ahead of them, so another tenant's first videos
are not held behind all of one tenant's backlog."""

from __future__ import annotations

import base64
import json

from sqlalchemy import select

from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from scheduler.dispatch import redis_priority

from .api_fixtures import T2V, T2V_POOL, submit

SEP = "\x06\x16"  # kombu's separator between a queue's name and its priority level


def levels(broker, queue: str) -> dict[str, int]:
    """Job id -> the priority level of the Redis list its message waits in (0 first)."""
    found = {}
    for key in broker.keys(f"{queue}*"):
        name = key.decode() if isinstance(key, bytes) else key
        level = int(name.split(SEP)[1]) if SEP in name else 0
        for raw in broker.lrange(key, 0, -1):
            body = json.loads(raw)["body"]
            args, _kwargs, _embed = json.loads(base64.b64decode(body))
            found[args[0]] = level
    return found


def in_creation_order(settings, batch_id: str) -> list[str]:
    with session_scope(settings.database_url) as session:
        return list(
            session.execute(
                select(Job.id).where(Job.batch_id == batch_id).order_by(Job.created_at)
            ).scalars()
        )


def test_a_big_batch_does_not_hold_another_tenants_videos_behind_it(
    client, acme, globex, broker, settings
):
    assert (settings.fair_share_step, settings.fair_share_levels) == (8, 2)
    video = {"model": T2V, "prompt": "a red panda"}
    big = client.post("/v1/batches", json={"requests": [video] * 20}, headers=acme).json()
    small = client.post("/v1/batches", json={"requests": [video] * 2}, headers=globex).json()
    interactive = submit(client, acme).json()  # priority 0, acme's 21st queued job

    queue = levels(broker, f"gpu.{T2V_POOL}")
    batch_level = redis_priority(-5)
    acme_levels = [queue[job] for job in in_creation_order(settings, big["id"])]
    # acme's batch: 8 jobs at the batch level, then one level lower per 8 ahead, at most 2.
    assert acme_levels == sorted(acme_levels)
    assert acme_levels[0] == batch_level and acme_levels[-1] == batch_level + 2
    assert sum(level > batch_level for level in acme_levels) >= 10
    # globex's first videos wait behind at most 8 of acme's, not 20.
    globex_levels = [queue[job] for job in in_creation_order(settings, small["id"])]
    assert globex_levels == [batch_level, batch_level]
    # Priority still comes first: acme's interactive video, demoted for its backlog, is
    # still ahead of every batch video.
    assert queue[interactive["id"]] == redis_priority(0) + 2 < batch_level
