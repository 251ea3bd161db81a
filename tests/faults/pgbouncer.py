"""The distribution's PgBouncer in front of a test's PostgreSQL (tests/faults/pg_cluster.py), in
transaction mode, as operators run it before chatd (docs/operations.md, "PgBouncer").

PgBouncer refuses to run as root; like the test clusters, it then runs as the system user
`pgserver`. Its admin console (database `pgbouncer`) tells a test that traffic went through it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import asyncpg

from app.db.embedded import EmbeddedPostgres
from tests.conditions import wait_for
from tests.faults.pg_cluster import (
    DATABASE,
    SUPERUSER,
    SYSTEM_USER,
    PgCluster,
    _as_root,
    _new_base_dir,
    free_port,
)


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(path).exists()),
        None,
    )


class PgBouncer:
    """`pgbouncer` in transaction pooling mode for the `chatd` database of `cluster`."""

    def __init__(self, cluster: PgCluster, *, pool_size: int = 10) -> None:
        binary = pgbouncer_binary()
        assert binary is not None, "pgbouncer is not installed"
        self._binary = binary
        self.port = free_port()
        self.host = "127.0.0.1"
        # A directory the system user can reach (a test's tmp_path is private to root).
        self._dir = _new_base_dir("chatd-pgb-")
        self.log_path = self._dir / "pgbouncer.log"
        (self._dir / "users.txt").write_text(f'"{SUPERUSER}" ""\n')
        (self._dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{DATABASE} = host={cluster.host} port={cluster.port} dbname={DATABASE}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self._dir / 'users.txt'}\n"
            f"admin_users = {SUPERUSER}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            # What chatd would otherwise send as a startup parameter (ENGINE_SERVER_SETTINGS):
            # a replica stalled inside a transaction must not hold its row locks for long.
            "idle_transaction_timeout = 5\n"
            f"logfile = {self.log_path}\n"
            f"pidfile = {self._dir / 'pgbouncer.pid'}\n"
        )
        if _as_root():
            for path in (self._dir, *self._dir.iterdir()):
                shutil.chown(path, SYSTEM_USER, SYSTEM_USER)
        self._process: asyncio.subprocess.Process | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{DATABASE}"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            self._binary,
            str(self._dir / "pgbouncer.ini"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            user=SYSTEM_USER if _as_root() else None,
        )

        async def accepts() -> bool:
            assert self._process is not None
            if self._process.returncode is not None:
                assert self._process.stdout is not None
                output = (await self._process.stdout.read()).decode(errors="replace")
                raise AssertionError(f"pgbouncer exited: {output}{self.logs()}")
            try:
                conn = await asyncpg.connect(self.dsn, timeout=2, statement_cache_size=0)
            except (OSError, asyncpg.PostgresError):
                return False
            await conn.close()
            return True

        accepted: bool = await wait_for(
            accepts, timeout_s=20, interval_s=0.05, message="pgbouncer accepting"
        )
        assert accepted

    async def transactions_served(self) -> int:
        """Transactions PgBouncer passed to the server for the `chatd` database (`SHOW STATS`
        on its admin console, which speaks only the simple query protocol: hence psql)."""
        psql = EmbeddedPostgres.bin_dir() / "psql"
        process = await asyncio.create_subprocess_exec(
            str(psql),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            "pgbouncer",
            "-At",
            "-F",
            "\t",
            "-c",
            "SHOW STATS",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        async with asyncio.timeout(10):
            output, _ = await process.communicate()
        text = output.decode(errors="replace")
        assert process.returncode == 0, text
        for line in text.splitlines():
            fields = line.split("\t")
            if fields[0] == DATABASE:
                return int(fields[1])  # total_xact_count
        raise AssertionError(f"no stats for {DATABASE}: {text}")

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            async with asyncio.timeout(10):
                await self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
