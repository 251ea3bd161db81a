"""The test suite's PostgreSQL: one server per test session (embedded, or the one named by
CHATD_TEST_DATABASE_URL), one migrated template database, and a fresh database per test cloned
from the template (CREATE DATABASE ... TEMPLATE is a file copy: milliseconds)."""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from app.db.connections import dsn_with_database
from app.db.embedded import EmbeddedPostgres, start_embedded_postgres
from app.db.migrate import migrate

# Durability is worthless for throwaway test databases; these make commits cheap. Only applied
# to the embedded server the suite starts itself, never to a server given by URL.
_TEST_SERVER_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@dataclass
class PgTestServer:
    admin_dsn: str  # a DSN to the maintenance database of the server
    template: str
    embedded: EmbeddedPostgres | None

    async def create_database(self) -> tuple[str, str]:
        name = f"chatd_test_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        finally:
            await conn.close()
        return name, dsn_with_database(self.admin_dsn, name)

    async def drop_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


async def start_pg_test_server() -> PgTestServer:
    url = os.environ.get("CHATD_TEST_DATABASE_URL", "")
    embedded: EmbeddedPostgres | None = None
    if not url:
        # Short path: the server's Unix socket lives in the data directory (108-byte limit).
        data_dir = Path(tempfile.mkdtemp(prefix="chatd-pg-"))
        embedded = start_embedded_postgres(data_dir)
        url = embedded.dsn
    server = PgTestServer(
        admin_dsn=url, template=f"chatd_template_{os.getpid()}", embedded=embedded
    )
    conn = await asyncpg.connect(url)
    try:
        if embedded is not None:
            for name, value in _TEST_SERVER_SETTINGS.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        await conn.execute(f'DROP DATABASE IF EXISTS "{server.template}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{server.template}"')
    finally:
        await conn.close()
    template_conn = await asyncpg.connect(dsn_with_database(url, server.template))
    try:
        await migrate(template_conn)
    finally:
        await template_conn.close()
    return server
