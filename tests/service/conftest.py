"""Session-wide local servers: Valkey, SeaweedFS S3 and PostgreSQL on free loopback ports.

Each is started once per session in a pytest tmp dir and stopped at the end. They come from
the `service` extra, which `make test` installs: a missing package is an error, not a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fvb_tools.localstack import (
    RunningService,
    S3Service,
    start_postgres,
    start_seaweedfs,
    start_valkey,
)

from .api_fixtures import (  # noqa: F401 (fixtures of the API tests, per module)
    acme,
    broker,
    client,
    globex,
    keys,
    models_toml,
    s3,
    server_url,
    settings,
)
from .worker_inprocess import in_process  # noqa: F401 (the in-process worker's fixture)

S3_ACCESS_KEY = "localstack-test"
S3_SECRET_KEY = "localstack-test-secret"


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with start_valkey(tmp_path_factory.mktemp("valkey")) as service:
        yield service


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    with start_seaweedfs(data_dir, S3_ACCESS_KEY, S3_SECRET_KEY) as service:
        yield service


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with start_postgres(tmp_path_factory.mktemp("postgres")) as service:
        yield service
