"""``/readyz``: can this API do its work? The database, the broker and the store, each
checked with a deadline, concurrently, so a hung dependency answers "down" instead of
hanging the probe."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlparse

from sqlalchemy import text

from fvb_core.db.session import get_engine
from scheduler.api.context import ApiContext

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0
_executor = ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")


def check_database(context: ApiContext) -> None:
    with get_engine(context.settings.database_url).connect() as connection:
        connection.execute(text("SELECT 1"))


def check_broker(context: ApiContext) -> None:
    url = context.settings.broker_url
    if urlparse(url).scheme in ("redis", "rediss", "valkey", "valkeys"):
        import redis

        client = redis.Redis.from_url(
            url.replace("valkey", "redis", 1),
            socket_timeout=CHECK_TIMEOUT_S,
            socket_connect_timeout=CHECK_TIMEOUT_S,
        )
        try:
            if not client.ping():
                raise ConnectionError("broker did not answer PING")
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CHECK_TIMEOUT_S) as connection:
        connection.ensure_connection(max_retries=1)


def check_storage(context: ApiContext) -> None:
    context.ensure_bucket()  # creates the bucket if storage was down when the API started
    context.store.ping()


CHECKS = {"database": check_database, "broker": check_broker, "storage": check_storage}


def run_checks(context: ApiContext) -> dict[str, str]:
    """``{"database": "ok", "broker": "down: ...", ...}``."""
    futures = {name: _executor.submit(check, context) for name, check in CHECKS.items()}
    results = {}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT_S + 1)
            results[name] = "ok"
        except FutureTimeout:
            results[name] = f"down: no answer within {CHECK_TIMEOUT_S + 1:.0f}s"
        except Exception as err:
            results[name] = f"down: {type(err).__name__}: {err}"[:300]
    down = [name for name, result in results.items() if result != "ok"]
    if down:
        log.warning("not ready: %s", {name: results[name] for name in down})
    return results
