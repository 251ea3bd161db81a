"""The MCP server registry (docs/tools.md): what admins register, which servers a chat's runs use,
and the secrets that are never shown back.

A server is reached over `stdio` (a command this replica runs, with args and env) or `http`
(streamable HTTP: a url and headers). Every env and header value may be a credential, so the
API shows each as `[redacted]`; a client that sends a transport back with a redacted value keeps
the stored one, exactly as model-config API keys do (app/state/admin.py).

Every update bumps `version`. Replicas compare it with the version their connection and tool
list were made from (app/tools/mcp.py): a changed transport means a new connection, any change
a new tool list."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg

from app.db.queries import Conn, project_queries, transaction
from app.errors import Conflict, NotFound, ValidationFailed
from app.state.admin import REDACTED

Q = project_queries()

# The most servers one chat may choose at creation.
MAX_SERVERS_PER_CHAT = 32


@dataclass(frozen=True)
class StdioTransport:
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # sorted (name, value) pairs: hashable, comparable

    type: Literal["stdio"] = "stdio"

    def to_storage(self) -> dict[str, Any]:
        return {
            "type": "stdio",
            "command": self.command,
            "args": list(self.args),
            "env": dict(self.env),
        }

    def to_json(self) -> dict[str, Any]:
        return self.to_storage() | {"env": {name: REDACTED for name, _ in self.env}}

    def secrets(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True)
class HttpTransport:
    url: str
    headers: tuple[tuple[str, str], ...] = ()  # sorted (name, value) pairs

    type: Literal["http"] = "http"

    def to_storage(self) -> dict[str, Any]:
        return {"type": "http", "url": self.url, "headers": dict(self.headers)}

    def to_json(self) -> dict[str, Any]:
        return self.to_storage() | {"headers": {name: REDACTED for name, _ in self.headers}}

    def secrets(self) -> dict[str, str]:
        return dict(self.headers)


Transport = StdioTransport | HttpTransport


def stdio(
    command: str, args: list[str] | None = None, env: dict[str, str] | None = None
) -> StdioTransport:
    return StdioTransport(
        command=command, args=tuple(args or ()), env=tuple(sorted((env or {}).items()))
    )


def http(url: str, headers: dict[str, str] | None = None) -> HttpTransport:
    return HttpTransport(url=url, headers=tuple(sorted((headers or {}).items())))


def transport_from_storage(value: dict[str, Any]) -> Transport:
    if value.get("type") == "stdio":
        return stdio(value["command"], value.get("args"), value.get("env"))
    return http(value["url"], value.get("headers"))


@dataclass(frozen=True)
class McpServer:
    id: uuid.UUID
    name: str
    transport: Transport
    enabled: bool
    allow_tools: tuple[str, ...] | None  # None: every tool of the server
    deny_tools: tuple[str, ...]
    call_timeout_s: float | None  # None: the replica's setting
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> McpServer:
        allow = row["allow_tools"]
        return cls(
            id=row["id"],
            name=row["name"],
            transport=transport_from_storage(json.loads(row["transport"])),
            enabled=row["enabled"],
            allow_tools=tuple(allow) if allow is not None else None,
            deny_tools=tuple(row["deny_tools"]),
            call_timeout_s=row["call_timeout_s"],
            version=row["version"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def offers(self, tool_name: str) -> bool:
        """Whether a tool of this server is offered: allowed (no allow list, or on it) and not
        denied. The deny list wins."""
        if tool_name in self.deny_tools:
            return False
        return self.allow_tools is None or tool_name in self.allow_tools

    def to_json(self) -> dict[str, Any]:
        """The public shape: every env and header value redacted."""
        return {
            "id": str(self.id),
            "name": self.name,
            "transport": self.transport.to_json(),
            "enabled": self.enabled,
            "allow_tools": list(self.allow_tools) if self.allow_tools is not None else None,
            "deny_tools": list(self.deny_tools),
            "call_timeout_s": self.call_timeout_s,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


class Unset:
    """A PATCH field that was not given (None is a value for allow_tools and call_timeout_s)."""


UNSET: Final = Unset()


@dataclass(frozen=True)
class McpServerChanges:
    name: str | None = None
    transport: Transport | None = None
    enabled: bool | None = None
    allow_tools: tuple[str, ...] | Unset | None = UNSET
    deny_tools: tuple[str, ...] | None = None
    call_timeout_s: float | Unset | None = UNSET


def _secret_field(transport: Transport) -> str:
    return "transport.env" if isinstance(transport, StdioTransport) else "transport.headers"


def _refuse_redacted(transport: Transport) -> None:
    """A new server has no stored secret that a redacted value could stand for."""
    for name, value in transport.secrets().items():
        if value == REDACTED:
            field = f"{_secret_field(transport)}.{name}"
            raise ValidationFailed(
                f"{field} is {REDACTED!r}: send the real value",
                validations=[{"field": field, "detail": "no stored value to keep"}],
            )


def _keep_redacted_secrets(new: Transport, stored: Transport) -> Transport:
    """A client that read a server and sends its transport back sends `[redacted]` for each env
    or header value: the stored value of that name stays. A redacted value with no stored value
    of its name (or of another transport type) is refused."""
    kept: dict[str, str] = {}
    stored_secrets = stored.secrets() if type(stored) is type(new) else {}
    for name, value in new.secrets().items():
        if value != REDACTED:
            kept[name] = value
        elif name in stored_secrets:
            kept[name] = stored_secrets[name]
        else:
            field = f"{_secret_field(new)}.{name}"
            raise ValidationFailed(
                f"{field} is {REDACTED!r} but no value of that name is stored: send the real value",
                validations=[{"field": field, "detail": "no stored value to keep"}],
            )
    pairs = tuple(sorted(kept.items()))
    if isinstance(new, StdioTransport):
        return StdioTransport(command=new.command, args=new.args, env=pairs)
    return HttpTransport(url=new.url, headers=pairs)


def _name_taken(name: str) -> Conflict:
    return Conflict(f"an MCP server named {name!r} exists", detail="names are unique")


async def list_servers(pool: asyncpg.Pool) -> list[McpServer]:
    return [McpServer.from_record(row) for row in await pool.fetch(Q.sql("mcp_servers_list"))]


async def create_server(
    pool: asyncpg.Pool,
    *,
    name: str,
    transport: Transport,
    enabled: bool = True,
    allow_tools: tuple[str, ...] | None = None,
    deny_tools: tuple[str, ...] = (),
    call_timeout_s: float | None = None,
) -> McpServer:
    _refuse_redacted(transport)
    try:
        row = await pool.fetchrow(
            Q.sql("mcp_servers_insert"),
            name,
            json.dumps(transport.to_storage()),
            enabled,
            list(allow_tools) if allow_tools is not None else None,
            list(deny_tools),
            call_timeout_s,
        )
    except asyncpg.UniqueViolationError:
        raise _name_taken(name) from None
    assert row is not None
    return McpServer.from_record(row)


async def update_server(
    pool: asyncpg.Pool, server_id: uuid.UUID, changes: McpServerChanges
) -> McpServer:
    try:
        async with transaction(pool) as conn:
            current = await conn.fetchrow(Q.sql("mcp_servers_lock"), server_id)
            if current is None:
                raise NotFound("MCP server not found")
            transport = changes.transport
            if transport is not None:
                stored = McpServer.from_record(current).transport
                transport = _keep_redacted_secrets(transport, stored)
            allow = changes.allow_tools
            timeout = changes.call_timeout_s
            row = await conn.fetchrow(
                Q.sql("mcp_servers_update"),
                server_id,
                changes.name,
                json.dumps(transport.to_storage()) if transport is not None else None,
                changes.enabled,
                not isinstance(allow, Unset),
                list(allow) if isinstance(allow, tuple) else None,
                list(changes.deny_tools) if changes.deny_tools is not None else None,
                not isinstance(timeout, Unset),
                timeout if not isinstance(timeout, Unset) else None,
            )
    except asyncpg.UniqueViolationError:
        raise _name_taken(changes.name or "") from None
    assert row is not None
    return McpServer.from_record(row)


async def delete_server(pool: asyncpg.Pool, server_id: uuid.UUID) -> None:
    if await pool.fetchrow(Q.sql("mcp_servers_delete"), server_id) is None:
        raise NotFound("MCP server not found")


async def check_server_ids(conn: Conn, server_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """The ids a chat chose, each once and in the order given; every one must name a server
    (enabled or not: a disabled server simply offers nothing until it is enabled again)."""
    unique = list(dict.fromkeys(server_ids))
    if len(unique) > MAX_SERVERS_PER_CHAT:
        raise ValidationFailed(
            f"a chat may choose at most {MAX_SERVERS_PER_CHAT} MCP servers",
            validations=[{"field": "mcp_server_ids", "detail": "too many"}],
        )
    if not unique:
        return unique
    found = {row["id"] for row in await conn.fetch(Q.sql("mcp_servers_existing_ids"), unique)}
    unknown = [server_id for server_id in unique if server_id not in found]
    if unknown:
        raise ValidationFailed(
            "unknown MCP server ids",
            validations=[
                {"field": "mcp_server_ids", "detail": f"no MCP server {server_id}"}
                for server_id in unknown[:20]
            ],
        )
    return unique
