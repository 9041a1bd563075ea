"""A throwaway PostgreSQL cluster run with the machine's ``initdb``/``pg_ctl``; as root it
runs as the unprivileged ``postgres`` user (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import psycopg
from psycopg import sql

from devservers.common import HOST, START_TIMEOUT_S, free_port, tail, track, untrack

PG_USER = "postgres"
PG_BIN_ROOTS = (Path("/usr/lib/postgresql"),)
PG_SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    # Test speed: losing data on a machine crash is fine for throwaway servers.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}


def find_postgres_bin(path: str | None = None, roots: Iterable[Path] = PG_BIN_ROOTS) -> Path:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then the newest
    ``<root>/<version>/bin`` (Debian's layout)."""
    names = ("initdb", "pg_ctl", "postgres")
    on_path = shutil.which("pg_ctl", path=path)
    candidates = [Path(on_path).parent] if on_path else []
    for root in roots:
        versions = [p for p in root.glob("*/bin") if p.parent.name.isdigit()]
        candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in names):
            return bindir
    raise RuntimeError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) found on PATH or under "
        f"{', '.join(str(r) for r in roots)}/<version>/bin. Fix: apt-get install postgresql "
        "(or put a PostgreSQL bin directory on PATH)."
    )


class PostgresServer:
    """A throwaway PostgreSQL cluster (trust auth, superuser ``postgres``) run with pg_ctl.

    Args:
        bindir: directory holding initdb, pg_ctl and postgres.
        base: directory for ``data/``, ``sock/`` and ``postgres.log``.
        port: TCP port on 127.0.0.1; kept across :meth:`stop` / :meth:`start`.
        run_as: unprivileged user to run as (needed as root: initdb refuses root).

    Examples:
        >>> with start_postgres(tmp_path) as pg:  # doctest: +SKIP
        ...     pg.create_database("flows")
        ...     pg.stop(); pg.start()  # data survives
    """

    def __init__(self, bindir: Path, base: Path, port: int, run_as: str | None = None) -> None:
        self.bindir = bindir
        self.base = base
        self.port = port
        self.run_as = run_as
        self.data_dir = base / "data"
        self.socket_dir = base / "sock"
        self.log_path = base / "postgres.log"
        self._owns_base = False

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL of database ``dbname`` on this server."""
        return f"postgresql+psycopg://{PG_USER}@{HOST}:{self.port}/{dbname}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, or None when the server is not running."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        return self._ctl(["status"], check=False) == 0

    def _run(self, args: list[str], check: bool = True) -> int:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        ctl_log = self.base / "ctl.log"
        with ctl_log.open("ab") as log:
            code = subprocess.run(
                prefix + args, stdout=log, stderr=subprocess.STDOUT, cwd=self.base, check=False
            ).returncode
        if check and code != 0:
            raise RuntimeError(
                f"PostgreSQL command {args[0]} {args[1:3]} failed with code {code}; "
                f"output:\n{tail(ctl_log)}\nserver log:\n{tail(self.log_path)}"
            )
        return code

    def _ctl(self, args: list[str], check: bool = True) -> int:
        return self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args], check)

    def init(self) -> None:
        """Create the cluster (initdb) and write the dev settings into postgresql.conf."""
        initdb = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", PG_USER]
        self._run([*initdb, "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
        settings = dict(PG_SETTINGS, port=str(self.port))
        settings["unix_socket_directories"] = f"'{self.socket_dir}'"
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# devservers\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        """Start the server (``pg_ctl start -w``) and wait until it accepts connections."""
        if self.running:
            return
        track(self)
        self._ctl(["-l", str(self.log_path), "-w", "-t", str(int(START_TIMEOUT_S)), "start"])
        with self._connect():
            pass

    def stop(self) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``) of this server's data directory only."""
        if self.data_dir.exists() and self.running:
            self._ctl(["-m", "fast", "-w", "stop"])

    def restart(self) -> None:
        """Stop and start again on the same port; the data survives."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its files if this object created their directory."""
        try:
            self.stop()
        finally:
            untrack(self)
            if self._owns_base:
                shutil.rmtree(self.base, ignore_errors=True)

    def _connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(
            host=HOST, port=self.port, user=PG_USER, dbname=dbname, autocommit=True
        )

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its SQLAlchemy URL."""
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, closing its open connections."""
        with self._connect() as conn:
            query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(query.format(sql.Identifier(name)))

    def dagster_home(self, home: Path, db_name: str) -> Path:
        """Write ``home/dagster.yaml`` putting a Dagster instance's run, event log and
        schedule storage in database ``db_name`` of this server (dagster-postgres)."""
        import yaml

        config = {
            "storage": {
                "postgres": {
                    "postgres_db": {
                        "username": PG_USER,
                        "hostname": HOST,
                        "port": self.port,
                        "db_name": db_name,
                        # SQLAlchemy 2.1 maps a plain postgresql:// URL to psycopg 3;
                        # dagster-postgres is built on psycopg2.
                        "scheme": "postgresql+psycopg2",
                    }
                }
            },
            "telemetry": {"enabled": False},
        }
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        return home

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_postgres(workdir: Path) -> PostgresServer:
    """Create and start a PostgreSQL cluster on a free port.

    As root the cluster runs as user ``postgres`` and lives in a fresh directory under the
    system temp dir (that user cannot traverse root's 0700 pytest dirs); it is removed by
    :meth:`PostgresServer.close`. Otherwise it lives in ``workdir/postgres``.
    """
    bindir = find_postgres_bin()
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(PG_USER)
        except KeyError as exc:
            raise RuntimeError(
                f"Running as root, PostgreSQL must run as an unprivileged user {PG_USER!r}, "
                "which does not exist. Fix: apt-get install postgresql (creates it) or run "
                "the tests as a normal user."
            ) from exc
        base = Path(tempfile.mkdtemp(prefix="flow-pg-"))
        (base / "sock").mkdir()
        for path in (base, base / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)
        server = PostgresServer(bindir, base, free_port(), run_as=PG_USER)
        server._owns_base = True
    else:
        base = workdir / "postgres"
        (base / "sock").mkdir(parents=True, exist_ok=True)
        server = PostgresServer(bindir, base, free_port())
    try:
        server.init()
        server.start()
    except BaseException:
        server.close()
        raise
    return server
