"""Named SQL blocks loaded once from sql/queries/, and the transaction helper. Only the rooms
that own a query file run SQL (a query's name starts with its file's name); everything else
calls them."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources.abc import Traversable

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from app.db.sql_files import QUERIES_DIR, sql_files

# What a query function accepts: a plain connection or one borrowed from the pool.
Conn = asyncpg.Connection | PoolConnectionProxy


_HEADER = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*(?P<kind>:[a-z]+)?\s*$")


@dataclass(frozen=True)
class Query:
    name: str
    kind: str  # ":one", ":many", ":exec", ... as written in the header; documentation only
    sql: str
    source: str


class Queries:
    """Named SQL blocks: `-- name: runs_acquire :many` starts a block that ends at the next
    header. Loaded once at import; a duplicate name anywhere is an error."""

    def __init__(self, queries: dict[str, Query]) -> None:
        self._queries = queries

    @classmethod
    def load(cls, directory: Traversable = QUERIES_DIR) -> Queries:
        queries: dict[str, Query] = {}
        for path in sql_files(directory):
            for query in _parse(path):
                if query.name in queries:
                    raise ValueError(
                        f"query {query.name!r} is defined in {queries[query.name].source}"
                        f" and {query.source}"
                    )
                queries[query.name] = query
        return cls(queries)

    def names(self) -> list[str]:
        return sorted(self._queries)

    def sql(self, name: str) -> str:
        """The SQL text of a named block; a typo fails loudly at the call site."""
        try:
            return self._queries[name].sql
        except KeyError:
            raise KeyError(f"no query named {name!r} in sql/queries/") from None


@functools.cache
def project_queries() -> Queries:
    """sql/queries/ parsed once per process and shared by every room that runs SQL."""
    return Queries.load()


def _parse(path: Traversable) -> list[Query]:
    queries: list[Query] = []
    name: str | None = None
    kind = ""
    lines: list[str] = []

    def flush() -> None:
        if name is not None:
            body = "\n".join(lines).strip()
            if not body:
                raise ValueError(f"query {name!r} in {path} is empty")
            queries.append(Query(name=name, kind=kind, sql=body, source=path.name))

    for line in path.read_text(encoding="utf-8").splitlines():
        header = _HEADER.match(line)
        if header:
            flush()
            name, kind, lines = header["name"], header["kind"] or ":exec", []
        elif name is not None:
            lines.append(line)
    flush()
    return queries


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[Conn]:
    """A pooled connection inside one transaction. asyncpg shields the release from
    cancellation, so a cancelled caller never leaks a connection mid-transaction."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn
