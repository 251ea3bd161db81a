"""`chatd serve` as a user starts it: no DATABASE_URL, so it brings up its own PostgreSQL."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.replicas import ReplicaProcess

pytestmark = pytest.mark.e2e


async def test_serve_without_database_url_starts_embedded_postgres_and_answers_healthz(
    tmp_path: Path,
) -> None:
    # A short path of its own: the server's Unix socket lives in the data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="chatd-e2e-"))
    replica = ReplicaProcess(
        log_dir=tmp_path, env={"DATABASE_URL": "", "CHATD_DATA_DIR": str(data_dir)}
    )
    replica.start()
    try:
        await replica.wait_healthy(timeout_s=60)
        async with (
            aiohttp.ClientSession() as session,
            session.get(replica.url + "/healthz") as response,
        ):
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        assert f"chatd: data in {data_dir} (embedded PostgreSQL; psql: " in replica.logs()

        replica.signal(signal.SIGTERM)
        assert await replica.wait_exit() == 0
        # The embedded server stopped with the service.
        assert not (data_dir / "postmaster.pid").exists()
    finally:
        replica.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_serve_with_database_url_uses_that_server(tmp_path: Path, database_url: str) -> None:
    replica = ReplicaProcess(log_dir=tmp_path, env={"DATABASE_URL": database_url})
    replica.start()
    try:
        await replica.wait_healthy()
        assert "embedded PostgreSQL" not in replica.logs()
        replica.signal(signal.SIGTERM)
        assert await replica.wait_exit() == 0
    finally:
        replica.kill()
