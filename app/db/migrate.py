"""Schema migrations: sql/migrations/NNNN_name.sql applied in order, once, recorded in
chatd_migrations, serialized across replicas by a session advisory lock.

A migration may pull in a trigger file with a line `-- include: triggers/<file>.sql`; the
file's text is spliced in at that point and is part of the migration's checksum. Trigger
function names carry a version suffix (chats_notify_v1), so a trigger file is as immutable as
the migration that includes it: a change is a new _v2 file and a new migration."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable

import asyncpg

from app.db.connections import CONNECT_TIMEOUT_S
from app.db.sql_files import MIGRATIONS_DIR, SQL_DIR, include_file, sql_files
from app.log import get_logger

log = get_logger(__name__)

# Any fixed 64-bit number works; this one spells "chatd mig" in hex-ish and is documented in
# docs/operations.md so operators can see it in pg_locks.
MIGRATION_LOCK_KEY = 0x63686174646D6967

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_INCLUDE = re.compile(r"^--\s*include:\s*(?P<path>\S+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    pass


def load_migrations(directory: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    migrations: list[Migration] = []
    for path in sql_files(directory):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        sql = expand_includes(path.read_text(encoding="utf-8"))
        migrations.append(Migration(int(match["version"]), match["name"], sql))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version number: {versions}")
    return migrations


def expand_includes(sql: str) -> str:
    """Splice each `-- include: triggers/x.sql` line's file into the text."""
    return _INCLUDE.sub(lambda m: _read_include(m["path"]), sql)


def declared_schema_sql() -> str:
    """sql/schema.sql, the schema as declared (what all migrations together must produce)."""
    return expand_includes((SQL_DIR / "schema.sql").read_text(encoding="utf-8"))


def _read_include(relative: str) -> str:
    path = include_file(relative)
    if path is None:
        raise MigrationError(f"an include names a file outside triggers/: {relative}")
    return path.read_text(encoding="utf-8")


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet applied; return the names applied by this call.

    Safe to call from many processes at once: the advisory lock makes them take turns, and each
    one sees what the others applied. Each migration runs in its own transaction."""
    migrations = load_migrations()
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS chatd_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM chatd_migrations")
        }
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was edited after it"
                        " was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO chatd_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(f"{migration.version:04d}_{migration.name}")
            log.info("migration.applied", version=migration.version, name=migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def migrate_dsn(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
