"""requires_action in the state machine (app/state/chats.py, app/state/runs.py), on a real database
with no replica: the fenced write that hands a chat to its client, the client's answer, the
time-out, and every other way out (Stop, edit, archive, promote, a message queued meanwhile).
What is refused is refused with a typed error and changes nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from app.errors import Conflict, FencedOut, InvalidTransition, NotFound, ValidationFailed
from app.state import chats, runs
from app.state.client_tools import (
    ARCHIVED_RESULT,
    INTERRUPTED_RESULT,
    MAX_CLIENT_TOOLS,
    TIMED_OUT_RESULT,
    pending_call,
)
from app.state.model import Chat, Owner
from app.state.runs import RunToken, StepRecord
from tests import engine_harness, factories

WORKER = uuid.UUID("00000000-0000-0000-0000-00000000aaaa")

LOCATE = {
    "name": "get_location",
    "description": "Where the user is.",
    "input_schema": {"type": "object", "properties": {"precise": {"type": "boolean"}}},
}


async def _roles(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[str]:
    rows = await pool.fetch(
        "SELECT role FROM chat_messages WHERE chat_id = $1 AND NOT deleted ORDER BY id", chat_id
    )
    return [row["role"] for row in rows]


async def _last_content(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[dict[str, Any]]:
    raw = await pool.fetchval(
        "SELECT content FROM chat_messages WHERE chat_id = $1 AND NOT deleted"
        " ORDER BY id DESC LIMIT 1",
        chat_id,
    )
    content: list[dict[str, Any]] = json.loads(raw)
    return content


async def _chat_row(pool: asyncpg.Pool, chat_id: uuid.UUID) -> Chat:
    row = await pool.fetchrow("SELECT * FROM chats WHERE id = $1", chat_id)
    assert row is not None
    return Chat.from_record(row)


def _step(pending: list[dict[str, Any]], server_results: list[dict[str, Any]]) -> StepRecord:
    return StepRecord(
        assistant_content=[{"type": "tool_call", **call} for call in pending],
        tool_results=server_results,
    )


async def _running(pool: asyncpg.Pool, owner: Owner, text: str = "where am I?") -> Chat:
    chat, _ = await chats.create_chat(pool, owner, text, tools=[LOCATE])
    acquired = await runs.acquire(pool, WORKER, 10)
    return next(c for c in acquired if c.id == chat.id)


async def _requiring_action(
    pool: asyncpg.Pool, owner: Owner, *, calls: int = 1, timeout_s: float = 300.0, tag: str = ""
) -> tuple[Chat, list[dict[str, Any]]]:
    """A chat whose run's step called `calls` client tools, handed to its client."""
    running = await _running(pool, owner)
    pending = [
        pending_call(f"call_{tag}{i}", "get_location", {"precise": True}) for i in range(calls)
    ]
    chat = await runs.require_action(
        pool,
        runs.token_of(running),
        _step(pending, []),
        pending,
        timeout_s=timeout_s,
        model_config_id=running.model_config_id,
    )
    assert chat is not None
    return chat, pending


async def test_the_step_is_persisted_and_the_slot_freed(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    running = await _running(pool, owner)
    pending = [pending_call("call_c", "get_location", {})]
    server_result = {
        "type": "tool_result",
        "tool_call_id": "call_s",
        "name": "add",
        "result": 3,
        "is_error": False,
    }
    step = StepRecord(
        assistant_content=[
            {"type": "tool_call", "id": "call_s", "name": "add", "args": {"a": 1, "b": 2}},
            {"type": "tool_call", "id": "call_c", "name": "get_location", "args": {}},
        ],
        tool_results=[server_result],
    )
    async with pool.acquire() as conn:
        await factories.create_stream_part(conn, chat_id=running.id, generation=1)

    chat = await runs.require_action(
        pool,
        runs.token_of(running),
        step,
        pending,
        timeout_s=300,
        model_config_id=running.model_config_id,
    )

    assert chat is not None
    assert (chat.status, chat.worker_id, chat.pending_tool_calls) == (
        "requires_action",
        None,
        pending,
    )
    assert chat.action_deadline_at is not None and chat.action_deadline_at > chat.updated_at
    # The assistant's calls and the server-side result are durable; the live parts are gone.
    assert await _roles(pool, chat.id) == ["user", "assistant", "tool"]
    assert await _last_content(pool, chat.id) == [server_result]
    assert await pool.fetchval("SELECT count(*) FROM chat_stream_parts") == 0
    # No replica takes it: it waits for its client.
    assert await runs.acquire(pool, WORKER, 10) == []
    assert chat.to_json()["pending_tool_calls"] == pending


async def test_a_stop_marked_before_the_write_wins_and_nothing_is_written(
    pool: asyncpg.Pool,
) -> None:
    owner = await factories.create_owner(pool)
    running = await _running(pool, owner)
    await chats.interrupt(pool, owner, running.id)
    before = await engine_harness.state_snapshot(pool)
    pending = [pending_call("call_1", "get_location", {})]
    chat = await runs.require_action(
        pool,
        runs.token_of(running),
        _step(pending, []),
        pending,
        timeout_s=300,
        model_config_id=running.model_config_id,
    )
    assert chat is None
    assert await engine_harness.state_snapshot(pool) == before


async def test_a_run_that_lost_its_chat_is_fenced_out(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    running = await _running(pool, owner)
    stale = RunToken(running.id, WORKER, running.generation - 1)
    before = await engine_harness.state_snapshot(pool)
    pending = [pending_call("call_1", "get_location", {})]
    with pytest.raises(FencedOut):
        await runs.require_action(
            pool, stale, _step(pending, []), pending, timeout_s=300, model_config_id=None
        )
    assert await engine_harness.state_snapshot(pool) == before


async def test_the_clients_results_make_the_chat_pending(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, pending = await _requiring_action(pool, owner, calls=2)
    # Results in any order; the tool message follows the order of the calls.
    answered, message = await chats.submit_tool_results(
        pool,
        owner,
        chat.id,
        [
            {"tool_call_id": pending[1]["id"], "result": "denied", "is_error": True},
            {"tool_call_id": pending[0]["id"], "result": {"city": "Lyon"}},
        ],
    )
    assert (answered.status, answered.pending_tool_calls, answered.action_deadline_at) == (
        "pending",
        None,
        None,
    )
    assert message.role == "tool"
    assert message.content == [
        {
            "type": "tool_result",
            "tool_call_id": pending[0]["id"],
            "name": "get_location",
            "result": {"city": "Lyon"},
            "is_error": False,
        },
        {
            "type": "tool_result",
            "tool_call_id": pending[1]["id"],
            "name": "get_location",
            "result": "denied",
            "is_error": True,
        },
    ]
    assert await _roles(pool, chat.id) == ["user", "assistant", "tool"]
    # Any replica may now continue the turn.
    assert [c.id for c in await runs.acquire(pool, WORKER, 10)] == [chat.id]


@pytest.mark.parametrize(
    ("results", "error"),
    [
        ([{"tool_call_id": "call_0", "result": 1}], ValidationFailed),  # call_1 missing
        (
            [
                {"tool_call_id": "call_0", "result": 1},
                {"tool_call_id": "call_0", "result": 2},
                {"tool_call_id": "call_1", "result": 3},
            ],
            ValidationFailed,  # call_0 twice
        ),
        (
            [
                {"tool_call_id": "call_0", "result": 1},
                {"tool_call_id": "call_1", "result": 2},
                {"tool_call_id": "call_old", "result": 3},
            ],
            Conflict,  # not pending
        ),
        ([], ValidationFailed),
        ([{"tool_call_id": "call_0"}], ValidationFailed),  # no result
        ([{"tool_call_id": "call_0", "result": 1, "is_error": "yes"}], ValidationFailed),
        ([{"tool_call_id": "call_0", "result": "x" * 60_000}], ValidationFailed),
    ],
)
async def test_results_that_do_not_answer_exactly_the_pending_calls_change_nothing(
    pool: asyncpg.Pool, results: list[dict[str, Any]], error: type[Exception]
) -> None:
    owner = await factories.create_owner(pool)
    chat, _pending = await _requiring_action(pool, owner, calls=2)
    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(error):
        await chats.submit_tool_results(pool, owner, chat.id, results)
    assert await engine_harness.state_snapshot(pool) == before


async def test_an_answer_is_taken_once(pool: asyncpg.Pool) -> None:
    """Two clients answer at once (or one retries): the first wins, the second is refused."""
    owner = await factories.create_owner(pool)
    chat, pending = await _requiring_action(pool, owner)
    results = [{"tool_call_id": pending[0]["id"], "result": "here"}]
    outcomes = await asyncio.gather(
        *(chats.submit_tool_results(pool, owner, chat.id, results) for _ in range(2)),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["InvalidTransition", "tuple"]
    assert await _roles(pool, chat.id) == ["user", "assistant", "tool"]


async def test_a_late_answer_for_an_earlier_turn_is_refused(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, first = await _requiring_action(pool, owner, tag="a")
    await chats.submit_tool_results(
        pool, owner, chat.id, [{"tool_call_id": first[0]["id"], "result": "here"}]
    )
    # The turn goes on in a later run, which calls the client tool again.
    (running,) = await runs.acquire(pool, WORKER, 10)
    second = [pending_call("call_b0", "get_location", {})]
    assert await runs.require_action(
        pool,
        runs.token_of(running),
        _step(second, []),
        second,
        timeout_s=300,
        model_config_id=None,
    )
    before = await engine_harness.state_snapshot(pool)
    late = [{"tool_call_id": first[0]["id"], "result": "here again"}]
    with pytest.raises(Conflict, match="not pending"):
        await chats.submit_tool_results(pool, owner, chat.id, late)
    assert await engine_harness.state_snapshot(pool) == before
    # And once the chat is back with the user, any answer is refused.
    await chats.interrupt(pool, owner, chat.id)
    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(InvalidTransition):
        await chats.submit_tool_results(pool, owner, chat.id, late)
    assert await engine_harness.state_snapshot(pool) == before


async def test_another_users_chat_is_not_found(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    mallory = await factories.create_owner(pool)
    chat, pending = await _requiring_action(pool, owner)
    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(NotFound):
        await chats.submit_tool_results(
            pool, mallory, chat.id, [{"tool_call_id": pending[0]["id"], "result": 1}]
        )
    assert await engine_harness.state_snapshot(pool) == before


async def test_the_time_out_answers_with_errors_and_ends_the_turn(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    expired, pending = await _requiring_action(pool, owner, calls=2, timeout_s=0)
    waiting_long, _ = await _requiring_action(pool, owner, timeout_s=300, tag="w")
    # A message sent meanwhile was queued; the end of the turn sends it, as any turn's end does.
    with_queue, _ = await _requiring_action(pool, owner, timeout_s=0, tag="q")
    sent = await chats.send_message(pool, owner, with_queue.id, "next question", queue_limit=5)
    assert sent.queued is not None and sent.chat.status == "requires_action"

    ended = {chat.id: chat for chat in await runs.expire_actions(pool)}

    assert set(ended) == {expired.id, with_queue.id}
    assert (ended[expired.id].status, ended[expired.id].pending_tool_calls) == ("waiting", None)
    assert await _roles(pool, expired.id) == ["user", "assistant", "tool"]
    assert await _last_content(pool, expired.id) == [
        {
            "type": "tool_result",
            "tool_call_id": call["id"],
            "name": "get_location",
            "result": TIMED_OUT_RESULT,
            "is_error": True,
        }
        for call in pending
    ]
    assert ended[with_queue.id].status == "pending"
    assert await _roles(pool, with_queue.id) == ["user", "assistant", "tool", "user"]
    assert (await _chat_row(pool, waiting_long.id)).status == "requires_action"
    assert await runs.expire_actions(pool) == []


async def test_sweepers_at_once_time_each_chat_out_once(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat_ids = [
        (await _requiring_action(pool, owner, timeout_s=0, tag=str(i)))[0].id for i in range(6)
    ]
    swept = await asyncio.gather(*(runs.expire_actions(pool, limit=4) for _ in range(4)))
    counted = [chat.id for batch in swept for chat in batch]
    assert sorted(counted) == sorted(chat_ids)  # each once, whoever took it
    tool_messages = await pool.fetchval(
        "SELECT count(*) FROM chat_messages WHERE role = 'tool' AND chat_id = ANY($1)", chat_ids
    )
    assert tool_messages == len(chat_ids)


async def test_stop_answers_the_calls_interrupted_and_the_chat_waits(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, pending = await _requiring_action(pool, owner)
    queued = await chats.send_message(pool, owner, chat.id, "later", queue_limit=5)
    assert queued.queued is not None
    stopped = await chats.interrupt(pool, owner, chat.id)
    assert (stopped.status, stopped.pending_tool_calls, stopped.worker_id) == (
        "waiting",
        None,
        None,
    )
    assert await _last_content(pool, chat.id) == [
        {
            "type": "tool_result",
            "tool_call_id": pending[0]["id"],
            "name": "get_location",
            "result": INTERRUPTED_RESULT,
            "is_error": True,
        }
    ]
    # As after any Stop, the queue stays.
    assert await pool.fetchval("SELECT count(*) FROM chat_queued_messages") == 1
    again = await chats.interrupt(pool, owner, chat.id)  # idempotent
    assert again.version == stopped.version


async def test_an_edit_replaces_the_history_and_drops_the_calls(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, _pending = await _requiring_action(pool, owner)
    first_id = await pool.fetchval("SELECT min(id) FROM chat_messages WHERE chat_id = $1", chat.id)
    await chats.edit_message(pool, owner, chat.id, first_id, "where am I, really?")
    edited = await _chat_row(pool, chat.id)
    assert (edited.status, edited.pending_tool_calls, edited.action_deadline_at) == (
        "pending",
        None,
        None,
    )
    assert await _roles(pool, chat.id) == ["user"]


async def test_archiving_answers_the_calls_and_the_chat_waits(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, _pending = await _requiring_action(pool, owner)
    archived = await chats.update_chat(pool, owner, chat.id, archived=True)
    assert (archived.status, archived.archived, archived.pending_tool_calls) == (
        "waiting",
        True,
        None,
    )
    (result,) = await _last_content(pool, chat.id)
    assert (result["result"], result["is_error"]) == (ARCHIVED_RESULT, True)


async def test_promoting_a_queued_message_interrupts_and_sends_it(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, _pending = await _requiring_action(pool, owner)
    sent = await chats.send_message(pool, owner, chat.id, "forget it", queue_limit=5)
    assert sent.queued is not None
    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(NotFound):
        await chats.promote_queued(pool, owner, chat.id, sent.queued.id + 1000)
    assert await engine_harness.state_snapshot(pool) == before
    message = await chats.promote_queued(pool, owner, chat.id, sent.queued.id)
    assert message.role == "user"  # type: ignore[union-attr]
    promoted = await _chat_row(pool, chat.id)
    assert (promoted.status, promoted.pending_tool_calls) == ("pending", None)
    assert await _roles(pool, chat.id) == ["user", "assistant", "tool", "user"]


async def test_client_tools_are_checked_and_replaced_by_a_send(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    before = await engine_harness.state_snapshot(pool)
    bad_definitions: list[object] = [
        "get_location",
        [{"name": "has space", "input_schema": {"type": "object"}}],
        [{"name": "x" * 65, "input_schema": {"type": "object"}}],
        [{"name": "twice", "input_schema": {"type": "object"}}] * 2,
        [{"name": "no_schema"}],
        [{"name": "array_schema", "input_schema": {"type": "array"}}],
        [{"name": "bad_props", "input_schema": {"type": "object", "properties": []}}],
        [{"name": "extra", "input_schema": {"type": "object"}, "handler": "x"}],
        [{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(65)],
        [{"name": "add", "input_schema": {"type": "object"}}],  # a server-side tool's name
    ]
    for tools in bad_definitions:
        with pytest.raises(ValidationFailed):
            await chats.create_chat(
                pool, owner, "hi", tools=tools, server_tool_names={"add", "current_time"}
            )
    assert await engine_harness.state_snapshot(pool) == before
    assert MAX_CLIENT_TOOLS == 64

    chat, _ = await chats.create_chat(pool, owner, "hi", tools=[LOCATE])
    stored = await pool.fetchval("SELECT client_tools FROM chats WHERE id = $1", chat.id)
    assert json.loads(stored) == [LOCATE]
    assert await _client_tool_names(pool, chat.id) == ["get_location"]
    # A send without tools keeps them; with tools replaces them (also while busy: queued).
    await chats.send_message(pool, owner, chat.id, "more", queue_limit=5)
    assert await _client_tool_names(pool, chat.id) == ["get_location"]
    other = {"name": "pick_file", "input_schema": {"type": "object"}}
    await chats.send_message(pool, owner, chat.id, "more", queue_limit=5, tools=[other])
    assert await _client_tool_names(pool, chat.id) == ["pick_file"]
    await chats.send_message(pool, owner, chat.id, "more", queue_limit=5, tools=[])
    assert await _client_tool_names(pool, chat.id) == []


async def _client_tool_names(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[str]:
    """The chat's client tools as its next step reads them."""
    context = await runs.step_context(pool, chat_id)
    assert context is not None
    return [spec.name for spec in context.client_tools]
