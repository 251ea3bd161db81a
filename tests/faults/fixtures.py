"""Pytest fixtures of the fault-injection layer (imported by tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.faults.pg_cluster import PgCluster
from tests.faults.tcp_proxy import TcpProxy


@pytest.fixture
async def pg_cluster() -> AsyncIterator[PgCluster]:
    """A PostgreSQL server of this test's own, which it may restart, crash or stop."""
    cluster = await PgCluster.create()
    try:
        yield cluster
    finally:
        await cluster.destroy()


@pytest.fixture(scope="module")
def pg_cluster_module() -> Iterator[PgCluster]:
    """One server for the tests of a module that leave it running and healthy (a test that
    crashes it must restart it before it ends). The cluster holds no event-loop state, so each
    test drives it from its own loop."""
    cluster = asyncio.run(PgCluster.create())
    try:
        yield cluster
    finally:
        asyncio.run(cluster.destroy())


@pytest.fixture
async def pg_proxy(pg_cluster: PgCluster) -> AsyncIterator[TcpProxy]:
    """A TcpProxy in front of this test's own server: connect to `pg_cluster.dsn_via(proxy.host,
    proxy.port)`."""
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        yield proxy
