"""`chatd chat` against a real `chatd serve`: it prints the echoed answer as it streams, goes on
with --chat, turns Ctrl-C into an interrupt, and, against a server on the embedded database,
needs no flags at all (the local token `chatd serve` writes)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from app.config import local_token_path
from app.db.sql_files import PROJECT_ROOT
from app.http.auth import create_token
from tests import factories
from tests.conditions import wait_for
from tests.e2e.replicas import ReplicaProcess

pytestmark = pytest.mark.e2e

WORDS = " ".join(f"w{i}" for i in range(30))


class ChatProcess:
    """`chatd chat ...` as a subprocess whose stdout is read as it arrives."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout = ""

    @classmethod
    async def start(
        cls, *args: str, env: dict[str, str] | None = None, stdin: int | None = None
    ) -> ChatProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.cli",
            "chat",
            *args,
            cwd=PROJECT_ROOT,
            env=os.environ | {"CHATD_LOG_LEVEL": "WARNING"} | (env or {}),
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def type_line(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def read_until(self, text: str, timeout_s: float = 30) -> None:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            while text not in self.stdout:
                chunk = await self.process.stdout.read(1024)
                if not chunk:
                    raise AssertionError(f"stdout ended before {text!r}: {self.stdout!r}")
                self.stdout += chunk.decode()

    async def finish(self, timeout_s: float = 30) -> tuple[int, str, str]:
        async with asyncio.timeout(timeout_s):
            out, err = await self.process.communicate()
        self.stdout += out.decode()
        assert self.process.returncode is not None
        return self.process.returncode, self.stdout, err.decode()


@pytest.fixture
async def server(tmp_path: Path, database_url: str) -> AsyncIterator[ReplicaProcess]:
    replica = ReplicaProcess(
        log_dir=tmp_path,
        name="serve",
        env={"DATABASE_URL": database_url, "CHATD_PART_FLUSH_INTERVAL_MS": "10"},
    )
    replica.start()
    try:
        await replica.wait_healthy(timeout_s=60)
        yield replica
    finally:
        replica.kill()


async def _slow_default_model(pool: asyncpg.Pool, token_delay_ms: int) -> None:
    """What demos use: the echo model, slowed down so that streaming is visible."""
    async with pool.acquire() as conn, conn.transaction():
        await factories.create_model_config(conn, is_default=True, token_delay_ms=token_delay_ms)


async def test_chat_prints_the_answer_as_it_streams_and_continues_a_chat(
    server: ReplicaProcess, pool: asyncpg.Pool
) -> None:
    token = await create_token(pool, "cli-user")
    # Half a second between words: the first ones are on the terminal long before the last.
    await _slow_default_model(pool, token_delay_ms=500)
    chat = await ChatProcess.start("hello a b c d", "--url", server.url, "--token", token)
    await chat.read_until("echo: hello")
    answers = await pool.fetchval("SELECT count(*) FROM chat_messages WHERE role = 'assistant'")
    assert (answers, chat.process.returncode) == (0, None)  # still streaming
    code, out, err = await chat.finish()
    assert code == 0, err
    assert out.strip() == "echo: hello a b c d"
    chat_id = err.split("chat ", 1)[1].split()[0]
    uuid.UUID(chat_id)

    again = await ChatProcess.start(
        "more", "--chat", chat_id, "--url", server.url, "--token", token
    )
    code, out, err = await again.finish()
    assert (code, out.strip()) == (0, "echo: more"), err
    rows = await pool.fetch(
        "SELECT role FROM chat_messages WHERE chat_id = $1 ORDER BY id", uuid.UUID(chat_id)
    )
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]


async def test_ctrl_c_interrupts_the_run_and_keeps_the_partial_answer(
    server: ReplicaProcess, pool: asyncpg.Pool
) -> None:
    token = await create_token(pool, "cli-user")
    await _slow_default_model(pool, token_delay_ms=200)
    chat = await ChatProcess.start(f"stop me {WORDS}", "--url", server.url, "--token", token)
    await chat.read_until("echo: stop")
    chat.process.send_signal(signal.SIGINT)
    code, out, err = await chat.finish()
    assert code == 0, err
    assert "[interrupting" in err
    assert out.startswith("echo: stop") and len(out.strip()) < len(f"echo: stop me {WORDS}")
    row = await pool.fetchrow("SELECT id, status FROM chats ORDER BY created_at DESC LIMIT 1")
    assert row is not None and row["status"] == "waiting"
    answer = await pool.fetchval(
        "SELECT content FROM chat_messages WHERE chat_id = $1 AND role = 'assistant'", row["id"]
    )
    assert answer is not None and json.loads(answer)[0]["text"].startswith("echo: stop")


async def test_chat_asks_the_user_the_models_question_and_posts_the_answer(
    server: ReplicaProcess, pool: asyncpg.Pool
) -> None:
    token = await create_token(pool, "cli-user")
    question = {"question": "Which color do you like?", "choices": ["red", "blue"]}
    chat = await ChatProcess.start(
        f"/tool ask_user_question {json.dumps(question)}",
        "--url",
        server.url,
        "--token",
        token,
        stdin=asyncio.subprocess.PIPE,
    )
    await chat.read_until("2. blue")
    assert "? Which color do you like?" in chat.stdout
    row = await pool.fetchrow("SELECT id, status FROM chats ORDER BY created_at DESC LIMIT 1")
    assert row is not None and row["status"] == "requires_action"  # it waits for the answer
    await chat.type_line("2")  # the second choice
    code, out, err = await chat.finish()
    assert code == 0, err
    assert out.rstrip().endswith('echo: ask_user_question returned {"answer": "blue"}')
    assert '↳ ask_user_question: {"answer": "blue"}' in out  # the result, as it happened
    history = await pool.fetch(
        "SELECT role, content FROM chat_messages WHERE chat_id = $1 ORDER BY id", row["id"]
    )
    assert [r["role"] for r in history] == ["user", "assistant", "tool", "assistant"]
    (result,) = json.loads(history[2]["content"])
    assert (result["name"], result["result"]) == ("ask_user_question", {"answer": "blue"})


async def test_chat_reports_a_bad_token(server: ReplicaProcess) -> None:
    chat = await ChatProcess.start("hi", "--url", server.url, "--token", "chatd_wrong")
    code, out, err = await chat.finish()
    assert code == 1 and out == ""
    assert "401" in err and "invalid token" in err


async def test_serve_on_the_embedded_database_makes_chat_work_without_flags(
    tmp_path: Path,
) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="chatd-cli-"))  # short: the socket lives in it
    serve = ReplicaProcess(
        log_dir=tmp_path,
        name="embedded",
        # As on a fresh machine: no log level chosen.
        env={"DATABASE_URL": "", "CHATD_DATA_DIR": str(data_dir), "CHATD_LOG_LEVEL": ""},
    )
    serve.start()
    try:
        await serve.wait_healthy(timeout_s=90)
        token = local_token_path(data_dir).read_text().strip()
        # `make run` prints a usable token, and reads like a tool: a few lines, no library
        # chatter (pgserver's initdb output, the engine's INFO events).
        await wait_for(
            lambda: 'chatd chat "hello"' in serve.logs(), message="the token in the serve output"
        )
        printed = serve.logs().splitlines()
        assert f"chatd: local admin token: {token}" in printed
        assert len(printed) <= 10, printed
        assert all(line.startswith("chatd: ") for line in printed), printed
        chat = await ChatProcess.start(
            "hello local",
            env={"CHATD_DATA_DIR": str(data_dir), "CHATD_PORT": str(serve.port)},
        )
        code, out, err = await chat.finish()
        assert (code, out.strip()) == (0, "echo: hello local"), err
        serve.signal(signal.SIGTERM)
        assert await serve.wait_exit() == 0
    finally:
        serve.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
