"""Test data factories: sensible defaults, explicit overrides (in the spirit of Coder's dbgen).
Tests call these instead of repeating INSERTs, so a schema change is mended in one place."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from app.db import Conn

DEFAULT_ORGANIZATION_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")
ECHO_MODEL_CONFIG_ID = uuid.UUID("00000000-0000-0000-0000-0000000000e0")


async def create_user(conn: Conn, **overrides: Any) -> asyncpg.Record:
    values: dict[str, Any] = {
        "name": f"user-{uuid.uuid4().hex[:8]}",
        "is_admin": False,
        "organization_id": DEFAULT_ORGANIZATION_ID,
    } | overrides
    row = await conn.fetchrow(
        "INSERT INTO users (name, is_admin, organization_id) VALUES ($1, $2, $3) RETURNING *",
        values["name"],
        values["is_admin"],
        values["organization_id"],
    )
    assert row is not None
    return row


async def create_chat(
    conn: Conn, *, owner_id: uuid.UUID | None = None, **overrides: Any
) -> asyncpg.Record:
    if owner_id is None:
        owner_id = (await create_user(conn))["id"]
    values: dict[str, Any] = {
        "title": "a chat",
        "status": "waiting",
        "organization_id": DEFAULT_ORGANIZATION_ID,
        "model_config_id": ECHO_MODEL_CONFIG_ID,
        "parent_chat_id": None,
        "worker_id": None,
        "client_type": "api",
    } | overrides
    row = await conn.fetchrow(
        """
        INSERT INTO chats (owner_id, organization_id, title, status, model_config_id,
                           parent_chat_id, root_chat_id, worker_id, client_type, started_at)
        VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8,
                CASE WHEN $4 = 'running' THEN clock_timestamp() END)  -- as an acquire does
        RETURNING *
        """,
        owner_id,
        values["organization_id"],
        values["title"],
        values["status"],
        values["model_config_id"],
        values["parent_chat_id"],
        values["worker_id"],
        values["client_type"],
    )
    assert row is not None
    return row


def text_content(text: str) -> str:
    return json.dumps([{"type": "text", "text": text}])


async def create_message(
    conn: Conn, *, chat_id: uuid.UUID, role: str = "user", text: str = "hello"
) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO chat_messages (chat_id, role, content) VALUES ($1, $2, $3::jsonb) RETURNING *",
        chat_id,
        role,
        text_content(text),
    )
    assert row is not None
    return row


async def create_queued_message(
    conn: Conn, *, chat_id: uuid.UUID, text: str = "later"
) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO chat_queued_messages (chat_id, content) VALUES ($1, $2::jsonb) RETURNING *",
        chat_id,
        text_content(text),
    )
    assert row is not None
    return row


async def create_stream_part(
    conn: Conn, *, chat_id: uuid.UUID, generation: int = 1, text: str = "tok"
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """
        INSERT INTO chat_stream_parts (chat_id, generation, part)
        VALUES ($1, $2, $3::jsonb) RETURNING *
        """,
        chat_id,
        generation,
        json.dumps({"type": "text", "text": text}),
    )
    assert row is not None
    return row


async def create_organization(conn: Conn, **overrides: Any) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO organizations (name) VALUES ($1) RETURNING *",
        overrides.get("name", f"org-{uuid.uuid4().hex[:8]}"),
    )
    assert row is not None
    return row


async def create_spend_limit(
    conn: Conn,
    *,
    organization_id: uuid.UUID = DEFAULT_ORGANIZATION_ID,
    user_id: uuid.UUID | None = None,
    limit_micros: int = 1_000_000,
    period: str = "month",
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """
        INSERT INTO spend_limits (organization_id, user_id, limit_micros, period)
        VALUES ($1, $2, $3, $4) RETURNING *
        """,
        organization_id,
        user_id,
        limit_micros,
        period,
    )
    assert row is not None
    return row


async def record_spend(conn: Conn, *, chat_id: uuid.UUID, cost_micros: int) -> asyncpg.Record:
    """An assistant message that cost this much (what the worker records after a step)."""
    row = await conn.fetchrow(
        """
        INSERT INTO chat_messages (chat_id, role, content, cost_micros)
        VALUES ($1, 'assistant', '[{"type": "text", "text": "paid"}]'::jsonb, $2) RETURNING *
        """,
        chat_id,
        cost_micros,
    )
    assert row is not None
    return row
