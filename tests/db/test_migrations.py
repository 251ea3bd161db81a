"""Migrations: all of them together produce exactly the declared schema, they apply once, and
two `chatd migrate` processes racing on an empty database both succeed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from app.db.connections import dsn_with_database
from app.db.embedded import EmbeddedPostgres
from app.db.migrate import declared_schema_sql, load_migrations, migrate
from tests.pg import PgTestServer


def _pg_dump_schema(dsn: str) -> str:
    dump = subprocess.run(
        [
            str(EmbeddedPostgres.bin_dir() / "pg_dump"),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-table=chatd_migrations",
            dsn,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # Dumps differ in a session-random restrict key line on newer pg_dump versions.
    return "\n".join(
        line
        for line in dump.splitlines()
        if not line.startswith("\\restrict") and not line.startswith("\\unrestrict")
    )


async def test_all_migrations_produce_the_declared_schema(
    pg_server: PgTestServer, empty_database: str
) -> None:
    migrated = await asyncpg.connect(empty_database)
    try:
        await migrate(migrated)
    finally:
        await migrated.close()

    admin = await asyncpg.connect(pg_server.admin_dsn)
    declared_name = f"chatd_declared_{os.getpid()}"
    try:
        await admin.execute(f'CREATE DATABASE "{declared_name}" TEMPLATE template0')
        declared_dsn = dsn_with_database(pg_server.admin_dsn, declared_name)
        declared = await asyncpg.connect(declared_dsn)
        try:
            await declared.execute(declared_schema_sql())
        finally:
            await declared.close()
        migrated_dump, declared_dump = await asyncio.gather(
            asyncio.to_thread(_pg_dump_schema, empty_database),
            asyncio.to_thread(_pg_dump_schema, declared_dsn),
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{declared_name}" WITH (FORCE)')
        await admin.close()

    assert "CREATE UNLOGGED TABLE public.chat_stream_parts" in migrated_dump
    assert migrated_dump == declared_dump


async def test_migrate_twice_applies_nothing_the_second_time(empty_database: str) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        first = await migrate(conn)
        second = await migrate(conn)
        recorded = await conn.fetchval("SELECT count(*) FROM chatd_migrations")
    finally:
        await conn.close()
    assert first == [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert second == []
    assert recorded == len(first)


async def test_two_migrate_processes_at_once_both_succeed_and_apply_once(
    empty_database: str,
) -> None:
    env = os.environ | {"DATABASE_URL": empty_database}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.cli",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in processes))
    for process, (_stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()

    # Exactly one of them applied the migrations, the other found them applied.
    reports = sorted(stdout.decode().strip() for stdout, _ in outputs)
    assert reports[0] == "applied 0 migration(s)"
    assert reports[1].startswith(f"applied {len(load_migrations())} migration(s)")

    conn = await asyncpg.connect(empty_database)
    try:
        rows = await conn.fetch("SELECT version FROM chatd_migrations ORDER BY version")
        default_orgs = await conn.fetchval("SELECT count(*) FROM organizations")
    finally:
        await conn.close()
    assert [r["version"] for r in rows] == [m.version for m in load_migrations()]
    assert default_orgs == 1


async def test_an_edited_migration_is_refused(empty_database: str) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        await migrate(conn)
        await conn.execute("UPDATE chatd_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(Exception, match="edited after it was applied"):
            await migrate(conn)
    finally:
        await conn.close()
