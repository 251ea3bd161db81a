"""Test data factories: sensible defaults, explicit overrides (in the spirit of Coder's dbgen).
Every row a test needs is made here, so a schema change is mended in one place. (Tests of the
triggers and the simulated worker's flush write their own multi-row statements: the shape of
the statement is what they test.)"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.db.queries import Conn
from app.http.auth import create_token
from app.state.model import Owner

DEFAULT_ORGANIZATION_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")
ECHO_MODEL_CONFIG_ID = uuid.UUID("00000000-0000-0000-0000-0000000000e0")


async def create_user(conn: Conn | asyncpg.Pool, **overrides: Any) -> asyncpg.Record:
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
    conn: Conn | asyncpg.Pool,
    *,
    chat_id: uuid.UUID,
    role: str = "user",
    text: str = "hello",
    content: list[dict[str, Any]] | None = None,
    output_tokens: int = 0,
) -> asyncpg.Record:
    """A message; `content` (the parts) wins over `text`."""
    row = await conn.fetchrow(
        """
        INSERT INTO chat_messages (chat_id, role, content, output_tokens)
        VALUES ($1, $2, $3::jsonb, $4) RETURNING *
        """,
        chat_id,
        role,
        json.dumps(content) if content is not None else text_content(text),
        output_tokens,
    )
    assert row is not None
    return row


async def create_messages(
    conn: Conn | asyncpg.Pool, *, chat_id: uuid.UUID, count: int, size: int, role: str = "assistant"
) -> None:
    """`count` messages of about `size` characters each (`<n> xxx...`), in one statement."""
    await conn.execute(
        """
        INSERT INTO chat_messages (chat_id, role, content)
        SELECT $1, $4, jsonb_build_array(jsonb_build_object(
                   'type', 'text', 'text', n::text || ' ' || repeat('x', $3)))
        FROM generate_series(1, $2) AS n
        """,
        chat_id,
        count,
        size,
        role,
    )


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
    conn: Conn | asyncpg.Pool,
    *,
    chat_id: uuid.UUID,
    generation: int = 1,
    text: str = "tok",
    part: dict[str, Any] | None = None,
    message_role: str = "assistant",
) -> asyncpg.Record:
    """A live part of the step in progress; `part` wins over `text`."""
    row = await conn.fetchrow(
        """
        INSERT INTO chat_stream_parts (chat_id, generation, message_role, part)
        VALUES ($1, $2, $3, $4::jsonb) RETURNING *
        """,
        chat_id,
        generation,
        message_role,
        json.dumps(part if part is not None else {"type": "text", "text": text}),
    )
    assert row is not None
    return row


async def create_organization(conn: Conn | asyncpg.Pool, **overrides: Any) -> asyncpg.Record:
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


async def create_pending_chats(
    conn: Conn | asyncpg.Pool, *, owner_id: uuid.UUID, count: int
) -> list[uuid.UUID]:
    """`count` pending chats of one user in one statement (all older than any chat made later)."""
    rows = await conn.fetch(
        """
        INSERT INTO chats (owner_id, organization_id, title, status, model_config_id)
        SELECT $1, organization_id, 'flood', 'pending', $2
        FROM users, generate_series(1, $3)
        WHERE users.id = $1
        RETURNING id
        """,
        owner_id,
        ECHO_MODEL_CONFIG_ID,
        count,
    )
    return [row["id"] for row in rows]


async def create_owner(pool: asyncpg.Pool) -> Owner:
    """A new user, as the state machine sees its caller."""
    async with pool.acquire() as conn:
        user = await create_user(conn)
    return Owner(user_id=user["id"], organization_id=user["organization_id"])


@dataclass
class ApiUser:
    """A user with an API token, for tests that go through HTTP."""

    id: uuid.UUID
    organization_id: uuid.UUID
    name: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def create_api_user(
    pool: asyncpg.Pool, *, name: str | None = None, admin: bool = False
) -> ApiUser:
    name = name or f"user-{uuid.uuid4().hex[:8]}"
    token = await create_token(pool, name, admin=admin)
    row = await pool.fetchrow("SELECT id, organization_id FROM users WHERE name = $1", name)
    assert row is not None
    return ApiUser(row["id"], row["organization_id"], name, token)


async def create_model_config(
    conn: Conn | asyncpg.Pool,
    *,
    provider: str = "builtin",
    model: str = "echo",
    display_name: str | None = None,
    is_default: bool = False,
    context_limit: int = 200_000,
    compression_threshold: int = 70,
    **options: Any,
) -> uuid.UUID:
    """A model config; the builtin echo by default, with options (e.g. token_delay_ms=50 for a
    slow stream). `is_default` takes the default from the others, as the admin API does."""
    if is_default:
        await conn.execute("UPDATE chat_model_configs SET is_default = false WHERE is_default")
    config_id: uuid.UUID = await conn.fetchval(
        """
        INSERT INTO chat_model_configs (provider, model, display_name, is_default,
                                        context_limit, compression_threshold, options)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) RETURNING id
        """,
        provider,
        model,
        display_name or f"test {provider} {model}",
        is_default,
        context_limit,
        compression_threshold,
        json.dumps(options),
    )
    return config_id


async def create_fake_model_config(
    conn: Conn | asyncpg.Pool,
    base_url: str,
    *,
    provider: str = "anthropic",
    model: str = "claude-fake",
    context_limit: int = 200_000,
    compression_threshold: int = 70,
    **overrides: Any,
) -> uuid.UUID:
    """A model config of a real provider adapter pointed at a fake wire-format server (its key
    and base URL in the options, so replica processes reach the same server)."""
    options = {"api_key": "test-key", "base_url": base_url} | overrides
    return await create_model_config(
        conn,
        provider=provider,
        model=model,
        display_name=f"fake {provider}",
        context_limit=context_limit,
        compression_threshold=compression_threshold,
        **options,
    )


async def create_replica_row(
    conn: Conn | asyncpg.Pool,
    *,
    replica_id: uuid.UUID | None = None,
    hostname: str = "dead",
    pid: int = 1,
    address: str = "",
    heartbeat_age_s: float = 0.0,
) -> uuid.UUID:
    """A `chat_replicas` row with no live session behind it (its lock is free): a replica that
    is gone, or, with an old heartbeat, one that looks stuck."""
    replica_id = replica_id or uuid.uuid4()
    await conn.execute(
        """
        INSERT INTO chat_replicas (id, hostname, pid, address, heartbeat_at)
        VALUES ($1, $2, $3, $4, now() - make_interval(secs => $5))
        """,
        replica_id,
        hostname,
        pid,
        address,
        heartbeat_age_s,
    )
    return replica_id
