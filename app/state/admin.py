"""Data of the operator-facing routes: model configs (admin writes) and the replica list.

Invariant kept here: exactly one enabled default model config exists once one does, because
`create_chat` without a model falls back to it. So the default cannot be disabled, un-defaulted
or deleted; another config is made the default instead (which takes the flag in the same
transaction). A config that chats or messages still name cannot be deleted (409); disable it."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app.db.queries import project_queries, transaction
from app.errors import Conflict, NotFound

Q = project_queries()


# Option names whose values are credentials: stored, used by the providers, never shown.
SECRET_OPTION_NAMES = frozenset({"api_key"})
REDACTED = "[redacted]"


def redact_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """The options as clients may see them: credentials replaced by a marker that says one is
    set (any authenticated user can list model configs)."""
    return {
        name: REDACTED if name in SECRET_OPTION_NAMES and value else value
        for name, value in options.items()
    }


def _keep_redacted_secrets(options: dict[str, Any], current: asyncpg.Record) -> dict[str, Any]:
    """A client that read a config and sends its options back sends the redaction marker, not
    the secret: the stored secret stays."""
    stored = json.loads(current["options"])
    return {
        name: stored.get(name) if name in SECRET_OPTION_NAMES and value == REDACTED else value
        for name, value in options.items()
    }


@dataclass(frozen=True)
class ModelConfig:
    id: uuid.UUID
    provider: str
    model: str
    display_name: str
    context_limit: int
    compression_threshold: int
    is_default: bool
    enabled: bool
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> ModelConfig:
        return cls(
            id=row["id"],
            provider=row["provider"],
            model=row["model"],
            display_name=row["display_name"],
            context_limit=row["context_limit"],
            compression_threshold=row["compression_threshold"],
            is_default=row["is_default"],
            enabled=row["enabled"],
            options=json.loads(row["options"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "provider": self.provider,
            "model": self.model,
            "display_name": self.display_name,
            "context_limit": self.context_limit,
            "compression_threshold": self.compression_threshold,
            "is_default": self.is_default,
            "enabled": self.enabled,
            "options": redact_secrets(self.options),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class ModelConfigChanges:
    """A PATCH: None leaves a field as it is."""

    provider: str | None = None
    model: str | None = None
    display_name: str | None = None
    context_limit: int | None = None
    compression_threshold: int | None = None
    is_default: bool | None = None
    enabled: bool | None = None
    options: dict[str, Any] | None = None


async def list_model_configs(pool: asyncpg.Pool, *, include_disabled: bool) -> list[ModelConfig]:
    rows = await pool.fetch(Q.sql("admin_list_model_configs"), include_disabled)
    return [ModelConfig.from_record(row) for row in rows]


async def create_model_config(
    pool: asyncpg.Pool,
    *,
    provider: str,
    model: str,
    display_name: str = "",
    context_limit: int = 200_000,
    compression_threshold: int = 70,
    is_default: bool = False,
    enabled: bool = True,
    options: dict[str, Any] | None = None,
) -> ModelConfig:
    if is_default and not enabled:
        raise Conflict("the default model config must be enabled")
    try:
        async with transaction(pool) as conn:
            if is_default:
                await conn.execute(Q.sql("admin_clear_default_model_config"), None)
            row = await conn.fetchrow(
                Q.sql("admin_insert_model_config"),
                provider,
                model,
                display_name,
                context_limit,
                compression_threshold,
                is_default,
                enabled,
                json.dumps(options or {}),
            )
    except asyncpg.UniqueViolationError:
        raise Conflict("another model config became the default at the same time") from None
    assert row is not None
    return ModelConfig.from_record(row)


async def update_model_config(
    pool: asyncpg.Pool, config_id: uuid.UUID, changes: ModelConfigChanges
) -> ModelConfig:
    try:
        async with transaction(pool) as conn:
            current = await conn.fetchrow(Q.sql("admin_lock_model_config"), config_id)
            if current is None:
                raise NotFound("model config not found")
            is_default = current["is_default"] if changes.is_default is None else changes.is_default
            enabled = current["enabled"] if changes.enabled is None else changes.enabled
            if current["is_default"] and not is_default:
                raise Conflict(
                    "the default model config cannot stop being the default",
                    detail="make another config the default instead",
                )
            if is_default and not enabled:
                raise Conflict(
                    "the default model config must be enabled",
                    detail="make another config the default first",
                )
            if is_default and not current["is_default"]:
                await conn.execute(Q.sql("admin_clear_default_model_config"), config_id)
            row = await conn.fetchrow(
                Q.sql("admin_update_model_config"),
                config_id,
                changes.provider,
                changes.model,
                changes.display_name,
                changes.context_limit,
                changes.compression_threshold,
                changes.is_default,
                changes.enabled,
                json.dumps(_keep_redacted_secrets(changes.options, current))
                if changes.options is not None
                else None,
            )
    except asyncpg.UniqueViolationError:
        raise Conflict("another model config became the default at the same time") from None
    assert row is not None
    return ModelConfig.from_record(row)


async def delete_model_config(pool: asyncpg.Pool, config_id: uuid.UUID) -> None:
    try:
        async with transaction(pool) as conn:
            current = await conn.fetchrow(Q.sql("admin_lock_model_config"), config_id)
            if current is None:
                raise NotFound("model config not found")
            if current["is_default"]:
                raise Conflict(
                    "the default model config cannot be deleted",
                    detail="make another config the default first",
                )
            await conn.fetchrow(Q.sql("admin_delete_model_config"), config_id)
    except asyncpg.ForeignKeyViolationError:
        raise Conflict(
            "the model config is in use by chats or messages",
            detail='disable it instead: PATCH {"enabled": false}',
        ) from None


async def list_replicas(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(Q.sql("admin_list_replicas"))
    return [
        {
            "id": str(row["id"]),
            "hostname": row["hostname"],
            "pid": row["pid"],
            "address": row["address"],
            "started_at": row["started_at"].isoformat(),
            "heartbeat_age_s": round(float(row["heartbeat_age_s"]), 3),
            "running_chats": row["running_chats"],
        }
        for row in rows
    ]
