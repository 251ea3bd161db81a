"""Sub-agents: a chat's tools can start child chats (`parent_chat_id` = the chat), wait for
their answers, message them and close them. Children run like any chat, on any replica.

Rules: children cannot spawn children (one level keeps the tree and its costs bounded); a chat
reaches only its own children (others answer "not found"); Stop and archive of a parent reach
its children (app/chats.py). `wait` listens on the child's notifications with a deadline; it
never polls in a sleep loop."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app import chats
from app.chats import Chat, Owner
from app.db import project_queries
from app.errors import NotFound
from app.listener import Listener

Q = project_queries()
FINISHED = ("waiting", "error")


class SubagentError(Exception):
    """A sub-agent operation the calling chat may not do; shown to the model as a tool error."""


@dataclass(frozen=True)
class Parent:
    """The chat whose tool is running."""

    chat_id: uuid.UUID
    owner: Owner
    is_child: bool


async def spawn(pool: asyncpg.Pool, parent: Parent, prompt: str, title: str | None = None) -> Chat:
    if parent.is_child:
        raise SubagentError("sub-agents cannot spawn sub-agents")
    child, _message = await chats.create_chat(
        pool, parent.owner, prompt, title=title, parent_chat_id=parent.chat_id
    )
    return child


async def _child(pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow(Q.sql("get_child_chat"), child_id, parent.chat_id)
    if row is None:
        raise SubagentError(f"no sub-agent {child_id} of this chat")
    return row


async def child(pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID) -> Chat:
    """The child chat, or SubagentError when it is not a child of `parent`."""
    return Chat.from_record(await _child(pool, parent, child_id))


async def result(pool: asyncpg.Pool, child: asyncpg.Record) -> dict[str, Any]:
    answer = await pool.fetchval(Q.sql("last_assistant_text"), child["id"])
    body: dict[str, Any] = {"chat_id": str(child["id"]), "status": child["status"]}
    if child["status"] in FINISHED:
        body["answer"] = answer or ""
    if child["status"] == "error" and child["last_error"] is not None:
        body["error"] = child["last_error"]
    return body


async def wait(
    pool: asyncpg.Pool,
    listener: Listener,
    parent: Parent,
    child_id: uuid.UUID,
    *,
    timeout_s: float,
) -> dict[str, Any]:
    """Wait until the child finished its turn (waiting or error) or the deadline passed.

    The subscription is armed before the first read, so a child that finishes between the read
    and the wait still wakes us; every notification or resync triggers one re-read."""
    await _child(pool, parent, child_id)
    async with listener.subscribe(f"chat:{child_id}") as subscription:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    child = await _child(pool, parent, child_id)
                    if child["status"] in FINISHED:
                        return await result(pool, child)
                    await subscription.get()
    child = await _child(pool, parent, child_id)
    body = await result(pool, child)
    body["timed_out"] = child["status"] not in FINISHED
    return body


async def message(
    pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID, text: str, *, queue_limit: int
) -> dict[str, Any]:
    await _child(pool, parent, child_id)
    try:
        sent = await chats.send_message(pool, parent.owner, child_id, text, queue_limit=queue_limit)
    except NotFound as exc:
        raise SubagentError(str(exc)) from exc
    return {"chat_id": str(child_id), "queued": sent.queued is not None}


async def close(pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID) -> dict[str, Any]:
    await _child(pool, parent, child_id)
    closed = await chats.update_chat(pool, parent.owner, child_id, archived=True)
    return {"chat_id": str(child_id), "status": closed.status, "archived": closed.archived}
