"""A dedicated PostgreSQL server for one test, which the test may restart or crash at will (the
suite's shared server must never be restarted: every other test uses it).

It uses the server binaries of the `pgserver` wheel (`EmbeddedPostgres.bin_dir()`). initdb and
postgres refuse to run as root; like pgserver itself (postgres_server.py), when we are root we
run them as the unprivileged system user `pgserver` (created with `useradd` if missing) and give
that user the data directory.

Fast: the first cluster of a test process runs initdb once, starts the server, migrates the
`chatd` database and stops it, into a template data directory. Every cluster after that is a
copy of the template (tens of milliseconds) and a server start (a fraction of a second).

The server listens on TCP 127.0.0.1:<free port> (so a `TcpProxy` can sit in front of it) and on
a Unix socket in its own data directory. fsync and full_page_writes are off (the machine never
crashes under it, only PostgreSQL does), but synchronous_commit stays on: every commit's WAL
reaches the OS before the commit returns, so a crash restart (`pg_ctl stop -m immediate`, like a
`kill -9` of the postmaster) loses no committed transaction, exactly as on a production server,
and crash recovery empties UNLOGGED tables."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from app.db.embedded import EmbeddedPostgres
from app.db.migrate import migrate
from tests.conditions import wait_for

DATABASE = "chatd"
SUPERUSER = "postgres"
SYSTEM_USER = "pgserver"  # the user pgserver runs PostgreSQL as when we are root
COMMAND_TIMEOUT_S = 60.0

# Small and fast: a test cluster holds a few MB; connections are plentiful for 2-3 replicas
# (pool of 20 + listener each) plus the test's own pools.
SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "200",
    "max_wal_size": "64MB",
    "checkpoint_timeout": "30min",
    "log_min_messages": "warning",
    "log_connections": "off",
    "listen_addresses": "'127.0.0.1'",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_root() -> bool:
    return os.geteuid() == 0


def _ensure_system_user() -> None:
    import pwd  # noqa: PLC0415 (POSIX only)

    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", SYSTEM_USER], check=True, capture_output=True)


def _give_to_system_user(path: Path) -> None:
    if not _as_root():
        return
    shutil.chown(path, SYSTEM_USER, SYSTEM_USER)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(Path(root) / name, SYSTEM_USER, SYSTEM_USER)


async def _run(*args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run a PostgreSQL binary (as the system user when we are root) without blocking the event
    loop: a TcpProxy in the same loop must keep forwarding while pg_ctl waits."""
    binary = str(EmbeddedPostgres.bin_dir() / args[0])
    process = await asyncio.create_subprocess_exec(
        binary,
        *args[1:],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        user=SYSTEM_USER if _as_root() else None,
    )
    try:
        async with asyncio.timeout(timeout_s):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {process.returncode}:\n{text}")
    return text


# The template data directory of this process, once made.
_templates: dict[str, Path] = {}
# One lock per event loop (each test has its own loop; a lock belongs to one).
_template_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _remove_template() -> None:
    for template in _templates.values():
        shutil.rmtree(template.parent, ignore_errors=True)


def _new_base_dir(prefix: str) -> Path:
    """A directory the system user can traverse (mkdtemp makes it 0700)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    return base


def _make_empty_data_dir() -> Path:
    if _as_root():
        _ensure_system_user()
    data_dir = _new_base_dir("chatd-pgt-") / "data"
    data_dir.mkdir(mode=0o700)
    _give_to_system_user(data_dir)
    return data_dir


def _configure(data_dir: Path) -> None:
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\n# chatd fault-injection test cluster\n")
        for name, value in SERVER_SETTINGS.items():
            conf.write(f"{name} = {value}\n")


def _copy_data_dir(template: Path) -> Path:
    data_dir = _new_base_dir("chatd-pgf-") / "data"
    shutil.copytree(template, data_dir, symlinks=True)
    data_dir.chmod(0o700)
    (data_dir / "postmaster.pid").unlink(missing_ok=True)
    _give_to_system_user(data_dir)
    return data_dir


async def _template_data_dir() -> Path:
    """initdb + migrate once per test process; later clusters copy the result."""
    lock = _template_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        if "template" in _templates:
            return _templates["template"]
        data_dir = await asyncio.to_thread(_make_empty_data_dir)
        await _run(
            "initdb",
            "-D",
            str(data_dir),
            "--auth=trust",
            "--encoding=utf8",
            "--no-sync",
            "-U",
            SUPERUSER,
        )
        await asyncio.to_thread(_configure, data_dir)
        cluster = PgCluster(data_dir, owns_base=False)
        await cluster.start()
        try:
            admin = await asyncpg.connect(cluster.admin_dsn)
            try:
                await admin.execute(f'CREATE DATABASE "{DATABASE}"')
            finally:
                await admin.close()
            conn = await asyncpg.connect(cluster.dsn)
            try:
                await migrate(conn)
            finally:
                await conn.close()
        finally:
            await cluster.stop()
        _templates["template"] = data_dir
        atexit.register(_remove_template)
        return data_dir


class PgCluster:
    """One PostgreSQL server in its own data directory. `dsn` is the migrated `chatd` database
    over TCP; `admin_dsn` the maintenance database. The port stays the same across restarts."""

    def __init__(self, data_dir: Path, *, owns_base: bool = True) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.log_path = data_dir.parent / "postgres.log"
        self._owns_base = owns_base
        self.restarts = 0

    @classmethod
    async def create(cls) -> PgCluster:
        """A new server (copied from the template), started."""
        template = await _template_data_dir()
        data_dir = await asyncio.to_thread(_copy_data_dir, template)
        cluster = cls(data_dir)
        await cluster.start()
        return cluster

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{DATABASE}"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/postgres"

    def dsn_via(self, host: str, port: int) -> str:
        """The same database reached through another address (a TcpProxy in front)."""
        return f"postgresql://{SUPERUSER}@{host}:{port}/{DATABASE}"

    def _options(self) -> str:
        # The socket lives in the data directory (short path, owned by the system user).
        return f"-p {self.port} -k {self.data_dir}"

    async def start(self) -> None:
        if _as_root():
            self.log_path.touch()
            shutil.chown(self.log_path, SYSTEM_USER, SYSTEM_USER)
        await _run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            self._options(),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(COMMAND_TIMEOUT_S)),
            "start",
        )

    async def restart_fast(self) -> None:
        """`pg_ctl restart -m fast`: what a minor upgrade or a managed failover does. Every
        session is terminated (FATAL 57P01), open transactions roll back, the server is down
        while it checkpoints and starts again."""
        await _run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            self._options(),
            "-l",
            str(self.log_path),
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(COMMAND_TIMEOUT_S)),
            "restart",
        )
        self.restarts += 1

    async def crash_restart(self) -> None:
        """`pg_ctl stop -m immediate`, then start: like a power loss or an OOM kill of the
        postmaster. The start runs crash recovery, which empties every UNLOGGED table and resets
        its sequences."""
        await self.stop(mode="immediate")
        await self.start()
        self.restarts += 1

    async def stop(self, mode: str = "fast") -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        await _run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(COMMAND_TIMEOUT_S)),
            "stop",
        )

    async def destroy(self) -> None:
        """Stop the server (immediately: its data is thrown away) and delete its files."""
        try:
            await self.stop(mode="immediate")
        finally:
            if self._owns_base:
                await asyncio.to_thread(shutil.rmtree, self.data_dir.parent, ignore_errors=True)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def create_standby(self, *, synchronous: bool = True) -> PgCluster:
        """A streaming standby of this server (`pg_basebackup -R`), started. With `synchronous`,
        this server then waits for the standby to flush every commit (`synchronous_standby_names
        = '*'`), so a failover to it loses no committed transaction."""
        base = await asyncio.to_thread(_new_base_dir, "chatd-pgs-")
        data_dir = base / "data"
        if _as_root():
            shutil.chown(base, SYSTEM_USER, SYSTEM_USER)
        await _run(
            "pg_basebackup",
            "-D",
            str(data_dir),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-X",
            "stream",
            "-R",
            "--no-sync",
        )
        standby = PgCluster(data_dir)
        await standby.start()
        if synchronous:
            admin = await asyncpg.connect(self.admin_dsn)
            try:
                await admin.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                await admin.execute("SELECT pg_reload_conf()")
                await wait_for(
                    lambda: admin.fetchval(
                        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                    ),
                    timeout_s=COMMAND_TIMEOUT_S,
                    message="the standby streaming synchronously",
                )
            finally:
                await admin.close()
        return standby

    async def promote(self) -> None:
        """Make this standby a primary (`pg_ctl promote`, waiting until it accepts writes)."""
        await _run(
            "pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(int(COMMAND_TIMEOUT_S)), "promote"
        )


async def pg_cluster_context() -> AsyncIterator[PgCluster]:
    """The body of the fixtures (tests/faults/fixtures.py): a started cluster, destroyed after."""
    cluster = await PgCluster.create()
    try:
        yield cluster
    finally:
        await cluster.destroy()
