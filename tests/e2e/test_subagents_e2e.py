"""Sub-agents across real `chatd serve` processes: the replica running the parent is SIGKILLed
while the parent waits for its children, and all three chats still complete, each answered once.

The replicas reach the fake Anthropic server (in this test's process) through the model
config's `base_url` option; the children inherit that config from their parent."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import asyncpg
import pytest

from app.state import chats
from tests import engine_harness, factories
from tests.conditions import wait_for
from tests.e2e.cluster import Cluster
from tests.fakes import running
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.scenarios import (
    CHILD_NAMES,
    PARENT_PROMPT,
    SubagentScenario,
    chat_of,
    child_answer,
    kind_of,
)

pytestmark = pytest.mark.e2e


async def _children(pool: asyncpg.Pool, parent_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await pool.fetch("SELECT id FROM chats WHERE parent_chat_id = $1", parent_id)
    return [row["id"] for row in rows]


async def test_sigkill_of_the_parents_replica_while_it_waits_for_its_children(
    cluster: Cluster, pool: asyncpg.Pool
) -> None:
    hold_children = asyncio.Event()
    scenario = SubagentScenario(hold_children=hold_children)
    async with running(FakeAnthropicServer(responder=scenario)) as server:
        first, second = await cluster.start("a"), await cluster.start("b")
        await cluster.wait_ready(first, second)
        owner = await factories.create_owner(pool)
        model = await factories.create_fake_model_config(pool, server.base_url)
        parent, _ = await chats.create_chat(pool, owner, PARENT_PROMPT, model_config_id=model)

        # The parent is in wait_agent (its call is a live part of the step in progress) and
        # both children are held mid-answer by the fake server.
        async def parent_waiting() -> bool:
            parts = await engine_harness.parts_of(pool, parent.id)
            return any(json.loads(p["part"]).get("name") == "wait_agent" for p in parts)

        def children_answering() -> bool:
            steps = [r for r in server.requests if kind_of(r) == "step"]
            return sum(chat_of(r) == "child" for r in steps) >= len(CHILD_NAMES)

        await engine_harness.eventually(parent_waiting, timeout_s=30, message="the parent waiting")
        await wait_for(children_answering, timeout_s=30, message="both children asked the model")
        victim = await cluster.owner_of(parent.id)
        victim.signal(signal.SIGKILL)
        hold_children.set()

        children = await _children(pool, parent.id)
        assert len(children) == len(CHILD_NAMES)
        all_chats = [parent.id, *children]

        async def all_waiting() -> bool:
            statuses = await pool.fetch("SELECT status FROM chats WHERE id = ANY($1)", all_chats)
            return {row["status"] for row in statuses} == {"waiting"}

        await engine_harness.eventually(
            all_waiting, timeout_s=60, message="all three chats waiting"
        )

    survivor = second if victim is first else first
    # The parent: its completed spawn step was kept (no third child), the interrupted wait step
    # was redone once by the survivor, and the final answer quotes both children.
    history = await engine_harness.history(pool, parent.id)
    assert [role for role, _ in history] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    final_text = engine_harness.text_of(history[-1][1])
    for name in CHILD_NAMES:
        assert child_answer(name) in final_text
    assert len(await _children(pool, parent.id)) == len(CHILD_NAMES)
    final = await engine_harness.chat_row(pool, parent.id)
    assert (final.status, final.generation) == ("waiting", 2)
    assert f"chat_id={parent.id}" in survivor.logs()
    # Each child answered exactly once, whichever replica ran it.
    for child_id in children:
        roles = [role for role, _ in await engine_harness.history(pool, child_id)]
        assert roles == ["user", "assistant"]
    assert await pool.fetchval("SELECT count(*) FROM chat_stream_parts") == 0
