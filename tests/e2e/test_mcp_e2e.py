"""MCP servers with real `chatd serve` processes and a real MCP server (tests/tools/mcp_server.py,
written with the `mcp` SDK): an admin registers it through the HTTP API, a chat on the built-in
`script` model calls its tools, and the answer holds the result. Over stdio (the replica runs
the server as its child process, and stops it at shutdown) and over streamable HTTP; a crashing
and a hanging server give the model tool error results and the turn ends normally."""

from __future__ import annotations

import json
import signal
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.state.model import Chat
from tests import engine_harness, factories
from tests.conditions import wait_for
from tests.e2e.cluster import Cluster
from tests.e2e.replicas import ReplicaProcess
from tests.factories import ApiUser
from tests.mcp_harness import SCRIPT_MODEL_CONFIG_ID, http_mcp_server, pid_alive, stdio_transport

pytestmark = pytest.mark.e2e


class Api:
    """The HTTP API of one replica, as an admin."""

    def __init__(self, replica: ReplicaProcess, user: ApiUser, pool: asyncpg.Pool) -> None:
        self.replica = replica
        self.user = user
        self.pool = pool

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.replica.url + path, json=body, headers=self.user.headers
            ) as response,
        ):
            return response.status, await response.json()

    async def add_server(self, **fields: Any) -> uuid.UUID:
        status, body = await self.request("POST", "/api/v1/mcp-servers", fields)
        assert status == 201, body
        return uuid.UUID(body["id"])

    async def ask(self, text: str, **fields: Any) -> Chat:
        """A new chat on `script` with `text`; returns it once the turn has ended."""
        status, body = await self.request(
            "POST",
            "/api/v1/chats",
            {"content": text, "model_config_id": SCRIPT_MODEL_CONFIG_ID} | fields,
        )
        assert status == 201, body
        return await engine_harness.wait_status(
            self.pool, uuid.UUID(body["id"]), "waiting", "error", timeout_s=90
        )

    async def answer(self, chat: Chat) -> str:
        history = await engine_harness.history(self.pool, chat.id)
        assert [role for role, _ in history] == ["user", "assistant", "tool", "assistant"]
        return engine_harness.text_of(history[-1][1])


async def started(cluster: Cluster, pool: asyncpg.Pool) -> Api:
    replica = await cluster.start("r")
    await cluster.wait_ready(replica)
    return Api(replica, await factories.create_api_user(pool, admin=True), pool)


async def test_a_chat_calls_a_stdio_server_and_the_replica_stops_it_at_shutdown(
    cluster: Cluster, pool: asyncpg.Pool
) -> None:
    api = await started(cluster, pool)
    server_id = await api.add_server(
        name="test", transport=stdio_transport({"MCP_TEST_SECRET": "from-the-config"})
    )

    chat = await api.ask('/call test__add {"a": 2, "b": 3}', mcp_server_ids=[str(server_id)])
    assert chat.status == "waiting"
    assert await api.answer(chat) == 'result: {"result": 5.0}'

    whoami = await api.ask("/call test__whoami {}")
    answer = await api.answer(whoami)
    assert answer.startswith("result: ")
    server = json.loads(answer.removeprefix("result: "))
    assert server["secret"] == "from-the-config"
    assert pid_alive(server["pid"])

    # The replica's shutdown stops its stdio servers.
    api.replica.signal(signal.SIGTERM)
    assert await api.replica.wait_exit() == 0
    await wait_for(lambda: not pid_alive(server["pid"]), timeout_s=10, message="server stopped")


async def test_a_chat_calls_a_streamable_http_server(cluster: Cluster, pool: asyncpg.Pool) -> None:
    async with http_mcp_server() as url:
        api = await started(cluster, pool)
        await api.add_server(
            name="web",
            transport={"type": "http", "url": url, "headers": {"X-Api-Key": "k-42"}},
        )
        added = await api.ask('/call web__add {"a": 20, "b": 22}')
        assert await api.answer(added) == 'result: {"result": 42.0}'
        header = await api.ask('/call web__header {"name": "x-api-key"}')
        assert await api.answer(header) == 'result: {"result": "k-42"}'


async def test_a_crashing_and_a_hanging_server_give_error_results(
    cluster: Cluster, pool: asyncpg.Pool
) -> None:
    api = await started(cluster, pool)
    await api.add_server(name="test", transport=stdio_transport(), call_timeout_s=2)

    hung = await api.ask("/call test__hang {}")
    assert hung.status == "waiting"
    assert await api.answer(hung) == "result: error: MCP server 'test' did not answer within 2 s"

    crashed = await api.ask("/call test__crash {}")
    assert crashed.status == "waiting"
    assert (await api.answer(crashed)).startswith(
        "result: error: MCP server 'test' closed the connection during the call"
    )

    # The replica restarts the server: a later call is answered.
    async def answered() -> bool:
        chat = await api.ask('/call test__add {"a": 1, "b": 1}')
        return await api.answer(chat) == 'result: {"result": 2.0}'

    await engine_harness.eventually(
        answered, timeout_s=120, interval_s=0.5, message="the restarted server"
    )
    assert "mcp.server_down server=test" in api.replica.logs()
