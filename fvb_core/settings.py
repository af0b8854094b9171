"""Every setting of the service, read from the environment (prefix ``FVB_``) in one place.

The API, the scheduler, the workers, ``fvb`` and docker-compose all configure through this
object; nothing else reads the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # Frozen: one immutable, hashable object per process (cached clients key on it).
    model_config = SettingsConfigDict(env_prefix="FVB_", env_file=None, extra="ignore", frozen=True)

    # Where state lives.
    database_url: str = "sqlite:///.fvb/fvb.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint_url: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "fvb-videos"
    #: TOML file naming the models this deployment serves (see fvb_core/models_config.py).
    models_config: Path = Path("models.toml")

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    #: Without auth every request is tenant "default"; refused on a non-loopback address.
    auth_enabled: bool = True
    #: Wrong API keys one client address may send per minute before it gets 429.
    auth_failures_per_minute: int = 20
    #: Video downloads the API streams at once; more get 503 with Retry-After at once, so a
    #: hung store can hold only this many of the API's threads.
    max_concurrent_downloads: int = Field(default=16, ge=1)
    #: Timeout of the API's own store calls (downloads, input images, deletes): a request
    #: waits at most about this long for a store that stopped answering.
    request_store_timeout_s: float = Field(default=5.0, gt=0)
    #: Queued jobs one tenant may have; past it submissions get 429 with a Retry-After from
    #: the tenant's drain rate. An API key may set its own (``fvb keys create --max-queued``).
    max_queued_jobs: int = 100_000
    presign_expiry_s: int = 3600

    # Job life cycle.
    job_max_attempts: int = 3
    heartbeat_interval_s: float = 2.0
    #: A running job whose worker has not heart-beaten for this long is requeued.
    heartbeat_timeout_s: float = 60.0
    reaper_interval_s: float = 5.0

    # Scheduler (scheduler/release.py).
    #: Messages a pool's queue may hold per live consumer: Redis never holds the backlog.
    release_per_worker: int = Field(default=2, ge=1)
    #: Seconds between release passes while there is nothing to release.
    release_interval_s: float = Field(default=0.5, gt=0)
    #: A released job whose message is missing from the queue this long lost it.
    release_grace_s: float = Field(default=2.0, ge=0)
    #: The release lease: one scheduler releases; another takes over this long after it died.
    scheduler_lease_s: float = Field(default=10.0, gt=0)
    #: Fair share between tenants: the GPU work each was served counts half after this long.
    fair_share_half_life_s: float = Field(default=600.0, gt=0)
    #: A consumer that has not beaten this long is not counted as live.
    worker_timeout_s: float = Field(default=30.0, gt=0)
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    #: Redis broker: an unacknowledged message is redelivered after this; longer than any job.
    visibility_timeout_s: int = 6 * 3600
    progress_min_interval_s: float = 0.5

    # Storage behaviour.
    multipart_threshold_bytes: int = 8 * 1024 * 1024
    storage_retry_attempts: int = 6
    storage_retry_base_s: float = 0.5
    storage_retry_max_s: float = 8.0
    #: A store outage while a rendered job uploads is waited out (the encoded files stay on
    #: the worker's disk, the attempt keeps heart-beating, retries back off up to
    #: storage_retry_max_s) for at most this long; then the job goes back to the queue, or
    #: fails with storage_unavailable when it has no attempt left.
    storage_outage_max_s: float = Field(default=3600.0, gt=0)

    # Retention (scheduler/sweeper.py). A succeeded video's objects are deleted this many
    # seconds after it finished (a batch may set its own); None keeps them until deleted.
    retention_s: int | None = Field(default=None, gt=0)
    sweep_interval_s: float = Field(default=60.0, gt=0)
    #: Objects of attempts that lost, and unfinished multipart uploads, older than this go.
    orphan_max_age_s: float = Field(default=86400.0, gt=0)

    # Webhooks (scheduler/webhooks.py).
    #: Hosts or CIDRs a webhook URL may resolve to although loopback/private/link-local.
    webhook_allow_hosts: tuple[str, ...] = ()
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    #: Delivery retries back off from this, doubling, up to webhook_backoff_max_s; an event
    #: is given up after webhook_max_age_s of failed attempts.
    webhook_backoff_base_s: float = Field(default=5.0, gt=0)
    webhook_backoff_max_s: float = Field(default=300.0, gt=0)
    webhook_max_age_s: float = Field(default=3 * 86400.0, gt=0)
    webhook_poll_s: float = Field(default=1.0, gt=0)
    #: How often the scheduler folds the job trail into the roll-ups (fvb_core/db/rollup.py).
    rollup_interval_s: float = Field(default=1.0, gt=0)

    # Worker.
    #: Prompt embeddings a worker keeps for reuse by the next seeds of the same prompt.
    embedding_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    worker_pool: str = "default"
    worker_device: str | None = None
    worker_gpus: str | None = None
    pipeline_cache_size: int = Field(default=2, ge=1)

    # Command-line clients (``fvb submit``): the API to talk to and the key to use. Unset,
    # they come from a running ``fvb up`` (its ``stack.env``), else from api_host/api_port.
    api_url: str | None = None
    api_key: str | None = None
    #: ``fvb up``'s data dir: servers' data, logs, the dev key, ``stack.env``.
    data_dir: Path = Path(".fvb")
    #: Log lines of the API, scheduler and workers: JSON lines (``fvb_core/logs.py``), or
    #: "text" for a terminal.
    log_format: Literal["json", "text"] = "json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
