from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from app.db.connections import dsn_with_database
from tests.faults.fixtures import pg_cluster, pg_cluster_module, pg_proxy  # noqa: F401
from tests.pg import PgTestServer, start_pg_test_server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgTestServer]:
    server = asyncio.run(start_pg_test_server())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database_url(pg_server: PgTestServer) -> AsyncIterator[str]:
    """A fresh, fully migrated database for this test alone."""
    name, dsn = await pg_server.create_database()
    try:
        yield dsn
    finally:
        await pg_server.drop_database(name)


@pytest.fixture
async def empty_database(pg_server: PgTestServer) -> AsyncIterator[str]:
    """A database with nothing in it (not cloned from the migrated template)."""
    admin = await asyncpg.connect(pg_server.admin_dsn)
    name = f"chatd_empty_{os.getpid()}_{id(admin)}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        yield dsn_with_database(pg_server.admin_dsn, name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()
