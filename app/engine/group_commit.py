"""Group commit of the runs' step writes (docs/engine.md, "Group commit"): one per replica. A
run that persists a step or ends its turn hands its write (`runs.StepWrite`) to the committer
and waits for the outcome; the committer writes every write that is waiting in ONE transaction
(`runs.write_steps`: one statement locks the rows in id order, one statement writes all), so a
burst of turns that end together costs one BEGIN, two statements and one COMMIT with its WAL
flush, not four round trips and a flush per turn. The batching itself (nothing waits for
company; what arrives during a commit is the next batch; without the task a write goes alone)
is app/aio.Batcher's.

Every guarantee of the single write holds per run:
- Fencing: each write is fenced on its own token; a run that lost its chat gets FencedOut and
  nothing of it is written, the others commit.
- Order: a run has at most one write in flight, and its flusher was settled (or discarded)
  before it handed the write over, exactly as before a single write.
- One bad chat never fails the others: when a batch fails with anything but an outage, it
  certainly rolled back, and each of its writes is tried again alone, in a transaction of its
  own; only the write that fails alone fails (its run handles the error as it would have).
- An outage (app.db.failures.is_outage) fails every write of the batch with it and is never
  retried here: the batch may have committed, and a repeated persist would write a step twice.
  Each run handles the outage as it handles one today.

A run cancelled while its batch is in flight does not withdraw its write: it may still commit,
which is as safe as a single write whose commit raced the cancellation (the write is fenced and
its outcome is the turn's legitimate end)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from app import instruments
from app.aio import Batcher
from app.db.failures import is_outage
from app.db.queries import transaction
from app.log import get_logger
from app.state import runs
from app.state.runs import StepWrite, StepWritten

log = get_logger(__name__)

# The most writes in one transaction: bounds the statement's arrays and the time rows stay
# locked; a burst larger than this is written in consecutive transactions.
MAX_BATCH = 128


@dataclass
class GroupCommitStats:
    transactions: int = 0
    writes: int = 0
    isolated_retries: int = 0  # batches retried write by write after a non-outage failure


class GroupCommitter(Batcher[StepWrite, StepWritten]):
    """Writes the step writes of a replica's runs, as many per transaction as are waiting."""

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = MAX_BATCH) -> None:
        super().__init__(max_batch=max_batch)
        self._pool = pool
        self.stats = GroupCommitStats()

    async def write(self, write: StepWrite) -> StepWritten:
        """The write's outcome, once it committed with its batch; FencedOut when its run lost
        the chat; the batch's exception on an outage, its own one on any other failure."""
        return await self.submit(write)

    async def _serve_batch(self, writes: list[StepWrite]) -> Sequence[StepWritten | Exception]:
        try:
            async with transaction(self._pool) as conn:
                outcomes = await runs.write_steps(conn, writes)
        except Exception as exc:
            if len(writes) == 1 or is_outage(exc):
                raise
            self.stats.isolated_retries += 1
            log.warning("group_commit.isolating", writes=len(writes), error=repr(exc))
            alone: list[StepWritten | Exception] = []
            for write in writes:
                try:
                    alone.append(await self._serve_alone(write))
                except Exception as alone_exc:
                    alone.append(alone_exc)
            return alone
        self.stats.transactions += 1
        self.stats.writes += len(writes)
        instruments.GROUP_COMMIT_WRITES.observe(len(writes))
        return outcomes

    async def _serve_alone(self, write: StepWrite) -> StepWritten:
        return await runs.write_step(self._pool, write)
