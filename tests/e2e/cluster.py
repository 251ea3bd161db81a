"""Replica processes of one e2e test on the test database (`Cluster`), and the `cluster` fixture
that kills them at the end whatever happened."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests import engine_harness
from tests.e2e.replicas import ReplicaProcess


class Cluster:
    """Replica processes on the test database, killed at the end whatever happened."""

    def __init__(self, log_dir: Path, database_url: str, pool: asyncpg.Pool) -> None:
        self._log_dir = log_dir
        self._database_url = database_url
        self._pool = pool
        self.replicas: list[ReplicaProcess] = []

    async def start(self, name: str, **env: str) -> ReplicaProcess:
        replica = ReplicaProcess(
            log_dir=self._log_dir,
            name=name,
            env={"DATABASE_URL": self._database_url, "CHATD_LOG_LEVEL": "INFO"}
            | engine_harness.FAST_ENV
            | env,
        )
        replica.start()
        self.replicas.append(replica)
        return replica

    async def wait_ready(self, *replicas: ReplicaProcess) -> None:
        """Healthy, and registered in chat_replicas (the engine is running)."""
        await asyncio.gather(*(r.wait_healthy(timeout_s=60) for r in replicas))
        for replica in replicas:
            assert replica.process is not None
            pid = replica.process.pid

            async def registered(pid: int = pid) -> bool:
                count = await self._pool.fetchval(
                    "SELECT count(*) FROM chat_replicas WHERE pid = $1", pid
                )
                return bool(count)

            await engine_harness.eventually(
                registered, timeout_s=30, message=f"replica {pid} registered"
            )

    async def owner_of(self, chat_id: uuid.UUID) -> ReplicaProcess:
        pid = await self._pool.fetchval(
            "SELECT r.pid FROM chats c JOIN chat_replicas r ON r.id = c.worker_id WHERE c.id = $1",
            chat_id,
        )
        for replica in self.replicas:
            if replica.process is not None and replica.process.pid == pid:
                return replica
        raise AssertionError(f"chat {chat_id} is not owned by a replica of this test ({pid})")

    def kill_all(self) -> None:
        for replica in self.replicas:
            replica.kill()


@pytest.fixture
async def cluster(tmp_path: Path, database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, database_url, pool)
    try:
        yield cluster
    finally:
        cluster.kill_all()
