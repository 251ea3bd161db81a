"""Shared reads of the runs' step contexts (docs/engine.md, "Shared step-context reads"): one
per replica. Every model step starts from one read of its chat (`runs.step_context`: the row,
the model config, the prompt, the client tools, the MCP servers). When many runs start or go
on together (a burst of acquired chats, a flush window that ended many steps) their reads are
served by ONE statement for all of them (`runs.step_contexts`), not one round trip per chat;
a lone read is as fast as before. The batching is app/aio.Batcher's.

A read takes no lock and changes nothing, so sharing it changes no guarantee: each run still
reads after it subscribed to its chat's channel (the read begins after the caller asked for
it), and every chat's context is the state of its rows at the statement's snapshot. A failed
statement fails the reads of its batch, as it would have failed each alone."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from app.aio import Batcher
from app.state import runs
from app.state.runs import StepContext

# The most chats one statement reads; a larger burst is read in consecutive statements.
MAX_BATCH = 128


@dataclass
class ContextReadStats:
    statements: int = 0
    reads: int = 0


class StepContextReader(Batcher[uuid.UUID, StepContext | None]):
    """Reads the step contexts of a replica's runs, as many per statement as are waiting."""

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = MAX_BATCH) -> None:
        super().__init__(max_batch=max_batch)
        self._pool = pool
        self.stats = ContextReadStats()

    async def read(self, chat_id: uuid.UUID) -> StepContext | None:
        """The context of the chat's next model step, or None when the chat is gone."""
        return await self.submit(chat_id)

    async def _serve_batch(
        self, chat_ids: list[uuid.UUID]
    ) -> Sequence[StepContext | Exception | None]:
        contexts = await runs.step_contexts(self._pool, chat_ids)
        self.stats.statements += 1
        self.stats.reads += len(chat_ids)
        return contexts

    async def _serve_alone(self, chat_id: uuid.UUID) -> StepContext | None:
        return await runs.step_context(self._pool, chat_id)
