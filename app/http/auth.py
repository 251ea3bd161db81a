"""Users and API tokens. A token is random, shown once, and stored as its SHA-256; requests
present it as `Authorization: Bearer <token>`. The HTTP layer turns the authenticated `User` into
the `Owner` the state machine (app/state/chats.py) works for.

`ensure_local_token` is the zero-setup path of `make run`: with the embedded database, the
service creates a local admin user once, writes its token into the data directory (mode 0600),
and `chatd chat` reads it from there by default."""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from app.config import local_token_path, read_local_token
from app.db.queries import project_queries
from app.errors import Unauthorized, ValidationFailed
from app.state.model import Owner

Q = project_queries()

TOKEN_PREFIX = "chatd_"
# A real token is 49 characters; anything much longer is not worth hashing.
MAX_TOKEN_CHARS = 200
MAX_USER_NAME_CHARS = 200
LOCAL_USER_NAME = "local"


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    organization_id: uuid.UUID
    name: str
    is_admin: bool

    @property
    def owner(self) -> Owner:
        return Owner(user_id=self.id, organization_id=self.organization_id)


def new_token() -> str:
    """32 random bytes, URL-safe; the prefix makes a leaked token easy to recognize in a scan."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or Unauthorized."""
    if not authorization:
        raise Unauthorized("missing bearer token", detail="send Authorization: Bearer <token>")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("malformed authorization header", detail="expected: Bearer <token>")
    if len(token) > MAX_TOKEN_CHARS or not token.isascii() or not token.isprintable():
        raise Unauthorized("invalid token")
    return token


async def authenticate(pool: asyncpg.Pool, token: str) -> User:
    row = await pool.fetchrow(Q.sql("auth_user_by_token_hash"), hash_token(token))
    if row is None:
        raise Unauthorized("invalid token")
    return User(
        id=row["id"],
        organization_id=row["organization_id"],
        name=row["name"],
        is_admin=row["is_admin"],
    )


def _check_user_name(name: str) -> None:
    if (
        not name
        or len(name) > MAX_USER_NAME_CHARS
        or not name.isprintable()
        or name != name.strip()
    ):
        raise ValidationFailed(
            f"a user name has 1 to {MAX_USER_NAME_CHARS} printable characters,"
            " without surrounding spaces",
            validations=[{"field": "user", "detail": "invalid user name"}],
        )


async def create_token(pool: asyncpg.Pool, user_name: str, *, admin: bool = False) -> str:
    """Create the user if needed (default organization) and a new token for it; the token is
    returned once and never stored in clear."""
    _check_user_name(user_name)
    token = new_token()
    async with pool.acquire() as conn, conn.transaction():
        user = await conn.fetchrow(Q.sql("auth_upsert_user"), user_name, admin)
        assert user is not None
        await conn.fetchrow(Q.sql("auth_insert_token"), user["id"], hash_token(token))
    return token


async def ensure_local_token(pool: asyncpg.Pool, data_dir: Path) -> str:
    """The token of the local admin user of an embedded installation: the one already written in
    data_dir when it still authenticates, else a new one (written with mode 0600)."""
    existing = read_local_token(data_dir)
    if existing is not None:
        try:
            await authenticate(pool, bearer_token(f"Bearer {existing}"))
        except Unauthorized:
            pass
        else:
            return existing
    token = await create_token(pool, LOCAL_USER_NAME, admin=True)
    path = local_token_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    temporary.replace(path)
    return token
