"""The real Vercel AI SDK against two real `chatd serve` replicas: the `ai` package pinned in
tests/ai_sdk/package.json (its lock file beside it) runs tests/ai_sdk/client.mjs, which sends a
message through `DefaultChatTransport` to replica A, reads the answer with
`readUIMessageStream`, drops the connection mid-answer and resumes on replica B with
`reconnectToStream`. The answer it assembles must be the one chatd stored.

Node.js is needed: without `node` and `npm` the test is skipped (saying so), or fails with
CHATD_REQUIRE_NODE=1 (what .ci/run sets); `npm ci` installs the pinned packages when
tests/ai_sdk/node_modules is missing, and a failure of it fails the test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.db.sql_files import PROJECT_ROOT
from app.http.auth import create_token
from tests import factories
from tests.e2e.replicas import ReplicaProcess, replica_pair

pytestmark = pytest.mark.e2e

CLIENT_DIR = PROJECT_ROOT / "tests" / "ai_sdk"
# Long enough that the answer (one word per token_delay_ms) is still streaming when the client
# has read MID_WORDS words and moved to the other replica.
TEXT = " ".join(f"word{i}" for i in range(150))
MID_WORDS = 6
# Set by .ci/run: there a missing Node.js is an error, not a skip.
REQUIRE_ENV = "CHATD_REQUIRE_NODE"
ENV = {"CHATD_PART_FLUSH_INTERVAL_MS": "10", "CHATD_KEEPALIVE_INTERVAL_S": "1"}


async def _run(
    command: list[str], *, env: dict[str, str], timeout_s: float
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=CLIENT_DIR,
        env=os.environ | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{command} did not finish within {timeout_s}s") from None
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture(scope="module")
def node() -> str:
    """The Node.js that runs the client, with the pinned packages installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        why = "Node.js (node and npm) is not installed: the AI SDK client test needs it"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why} ({REQUIRE_ENV}=1)")
        pytest.skip(why)
    if not (CLIENT_DIR / "node_modules" / "ai").is_dir():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=CLIENT_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed in {CLIENT_DIR}:\n{done.stdout}{done.stderr}"
    return node


@pytest.fixture
async def replicas(
    tmp_path: Path, database_url: str
) -> AsyncIterator[tuple[ReplicaProcess, ReplicaProcess]]:
    async with replica_pair(tmp_path, {"DATABASE_URL": database_url} | ENV) as pair:
        yield pair


async def _get(url: str, headers: dict[str, str]) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_the_ai_sdk_sends_streams_and_resumes_on_another_replica(
    node: str, replicas: tuple[ReplicaProcess, ReplicaProcess], pool: asyncpg.Pool
) -> None:
    first, second = replicas
    token = await create_token(pool, f"ai-sdk-{uuid.uuid4().hex[:6]}")
    # New chats get the default model: the built-in echo, one word every 40 ms.
    await factories.create_model_config(pool, is_default=True, token_delay_ms=40)
    chat_id = str(uuid.uuid4())

    code, out, err = await _run(
        [node, "client.mjs"],
        env={
            "CHATD_A": first.url,
            "CHATD_B": second.url,
            "CHATD_TOKEN": token,
            "CHAT_ID": chat_id,
            "TEXT": TEXT,
            "MID_WORDS": str(MID_WORDS),
        },
        timeout_s=120,
    )
    assert code == 0, f"the AI SDK client failed:\n{err}\n{first.logs()[-3000:]}"
    seen = json.loads(out.strip().splitlines()[-1])

    headers = {"Authorization": f"Bearer {token}"}
    chat = await _get(f"{second.url}/api/v1/chats/{chat_id}", headers)
    assert chat["status"] == "waiting"
    page = await _get(f"{first.url}/api/v1/chats/{chat_id}/messages", headers)
    question, answer = page["messages"]
    assert question["content"] == [{"type": "text", "text": TEXT}]
    stored = "".join(part["text"] for part in answer["content"] if part["type"] == "text")
    assert stored == "echo: " + TEXT

    # The resumed stream assembled exactly the stored answer, as the same UI message the first
    # connection had started, of which the client had read a part when it dropped it.
    assert seen["final"]["text"] == stored
    assert seen["final"]["role"] == "assistant"
    assert seen["partial"]["id"] == seen["final"]["id"] == f"answer-{question['id']}"
    partial = seen["partial"]["text"]
    assert len(partial.split()) >= MID_WORDS
    assert stored.startswith(partial) and len(partial) < len(stored)
    assert [part["type"] for part in seen["final"]["parts"]] == ["step-start", "text"]

    types = seen["chunkTypes"]
    assert types[0] == "start" and types[-1] == "finish"
    assert types[1:3] == ["start-step", "text-start"]
    assert types[-3:-1] == ["text-end", "finish-step"]
    assert seen["idleAfterwards"] is True

    # The history as an app loads it after a reload (docs/api.md): the same two messages, the
    # answer under the id and with the parts the stream gave it.
    user, loaded_answer = seen["loaded"]
    assert (user["id"], user["role"], user["text"]) == (f"user-{question['id']}", "user", TEXT)
    assert loaded_answer["id"] == seen["final"]["id"]
    assert loaded_answer["text"] == stored
    assert [p["type"] for p in loaded_answer["parts"]] == ["step-start", "text"]

    # Where each request went: the send to A, the resume and the idle check to B.
    assert [(r["method"], r["url"].split("/api/")[0], r["status"]) for r in seen["requests"]] == [
        ("POST", first.url, 200),
        ("GET", second.url, 200),
        ("GET", second.url, 204),
        ("GET", second.url, 200),
    ]
