"""The worker's side of the chat state machine (docs/architecture.md, "Chat states"): acquire,
persist a step, finish a turn, complete an interrupt, give a chat back (shutdown, lost
liveness, dead replica), fail, wait for a client (requires_action) and give up waiting.

A run is fenced by its `RunToken` (worker_id, generation). Every write below is one transaction
that first locks the chat row on the condition "running, worker_id = me, generation = g"
(`runs_lock_owned`); when that matches nothing the run has lost its chat (an edit, an archive, a
requeue by another replica, a re-acquire) and `FencedOut` is raised with nothing written. The
user's side of the machine is in chats.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from app import instruments
from app.db.queries import Conn, project_queries, transaction
from app.errors import FencedOut
from app.providers.base import ModelConfig, ToolSpec, Usage
from app.state.client_tools import TIMED_OUT_RESULT, error_results
from app.state.mcp_servers import McpServer
from app.state.model import Chat, Message

Q = project_queries()

PartRole = Literal["assistant", "tool", "system"]
# The poison-chat guard's default bound (Settings.max_failed_runs).
DEFAULT_MAX_FAILED_RUNS = 5


@dataclass(frozen=True)
class RunToken:
    """The fencing token of one run: only writes that still match it are allowed."""

    chat_id: uuid.UUID
    worker_id: uuid.UUID
    generation: int


@dataclass(frozen=True)
class StepRecord:
    """What one model step leaves in the history: the assistant's content, the results of its
    tool calls (empty when it called none), its usage and cost."""

    assistant_content: list[dict[str, Any]]
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    cost_micros: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.assistant_content and not self.tool_results


@dataclass(frozen=True)
class StepWrite:
    """One run's fenced write of its step: `ends_turn` False persists a step whose tool calls
    ran (the turn goes on); True ends the turn (`step` is its last step, an interrupted step's
    output so far, or None), and the queue decides what follows."""

    token: RunToken
    step: StepRecord | None
    model_config_id: uuid.UUID | None
    ends_turn: bool
    interrupted: bool = False


@dataclass(frozen=True)
class StepWritten:
    """What a step write did: the row as it is now, the step's messages as inserted, and
    `next_message`, the queued message that continues the run (the chat stays running); None
    when a turn ended with the chat back to the user (waiting), or the turn goes on."""

    chat: Chat
    messages: list[Message]
    next_message: Message | None


# Why a chat_usage row has no message: a title request; an attempt that failed (retried or
# terminal); an interrupted step with no output to persist; a step dropped because its run
# stopped (shutdown, lost liveness, lost chat).
UsageKind = Literal["title", "failed_attempt", "interrupted", "abandoned"]


@dataclass(frozen=True)
class UsageRecord:
    """Usage that no message carries (chat_usage, see migration 0004)."""

    kind: UsageKind
    usage: Usage
    cost_micros: int
    model_config_id: uuid.UUID | None


async def record_usage(conn: Conn | asyncpg.Pool, chat_id: uuid.UUID, record: UsageRecord) -> None:
    await conn.execute(
        Q.sql("runs_record_usage"),
        chat_id,
        record.kind,
        record.model_config_id,
        record.usage.input_tokens,
        record.usage.output_tokens,
        record.usage.cache_read_tokens,
        record.usage.cache_write_tokens,
        record.cost_micros,
    )


def token_of(chat: Chat) -> RunToken:
    assert chat.worker_id is not None, "only a running chat has a token"
    return RunToken(chat.id, chat.worker_id, chat.generation)


async def acquire(
    pool: asyncpg.Pool, worker_id: uuid.UUID, limit: int, *, max_running_per_user: int = 25
) -> list[Chat]:
    """pending -> running for up to `limit` chats in one statement, fair across users and
    keeping each user under `max_running_per_user` (sql/queries/runs.sql, runs_acquire)."""
    chats, _held_back = await acquire_fairly(
        pool, worker_id, limit, max_running_per_user=max_running_per_user
    )
    return chats


async def acquire_fairly(
    pool: asyncpg.Pool, worker_id: uuid.UUID, limit: int, *, max_running_per_user: int
) -> tuple[list[Chat], bool]:
    """`acquire`, and whether a pending chat was left only because its owner is at the cap
    (then the end of a run may let it in: try again when one ends)."""
    if limit <= 0:
        return [], False
    rows = await pool.fetch(Q.sql("runs_acquire"), worker_id, limit, max_running_per_user)
    held_back = bool(rows and rows[0]["held_back"])
    acquired = [row for row in rows if row["id"] is not None]
    for row in acquired:
        instruments.ACQUIRE_LATENCY.observe(max(row["pending_s"], 0.0))
    return [Chat.from_record(row) for row in acquired], held_back


async def read_chat(pool: asyncpg.Pool, chat_id: uuid.UUID) -> Chat | None:
    row = await pool.fetchrow(Q.sql("runs_read_chat"), chat_id)
    return Chat.from_record(row) if row is not None else None


def owns(chat: Chat | None, token: RunToken) -> bool:
    """Whether the row still says this run owns the chat."""
    return (
        chat is not None
        and chat.status == "running"
        and chat.worker_id == token.worker_id
        and chat.generation == token.generation
    )


@dataclass(frozen=True)
class StepContext:
    """What a model step starts from, read in one statement (runs_step_contexts): the chat row,
    its model config, the prompt, its client tools and the MCP servers it uses."""

    chat: Chat
    config: ModelConfig
    messages: list[Message]
    client_tools: list[ToolSpec]
    mcp_servers: list[McpServer]


async def step_contexts(
    pool: asyncpg.Pool, chat_ids: Sequence[uuid.UUID]
) -> list[StepContext | LookupError | None]:
    """The contexts of the chats' next model steps in one statement, in the order asked: None
    for a chat that is gone, LookupError for one whose model config does not exist."""
    rows = await pool.fetch(Q.sql("runs_step_contexts"), list(chat_ids))
    by_id = {row["id"]: row for row in rows}
    return [_step_context(by_id.get(chat_id)) for chat_id in chat_ids]


async def step_context(pool: asyncpg.Pool, chat_id: uuid.UUID) -> StepContext | None:
    """The context of one chat's next model step, or None when the chat is gone."""
    (context,) = await step_contexts(pool, [chat_id])
    if isinstance(context, LookupError):
        raise context
    return context


def _step_context(row: asyncpg.Record | None) -> StepContext | LookupError | None:
    if row is None:
        return None
    config = row["model_config"]
    if config is None:
        return LookupError(f"the model config of chat {row['id']} does not exist")
    return StepContext(
        chat=Chat.from_record(row["chat"]),
        config=_model_config(config),
        messages=[Message.from_record(message) for message in row["messages"]],
        client_tools=_client_tools(row["client_tools"]),
        mcp_servers=[McpServer.from_record(server) for server in row["mcp_servers"]],
    )


def _model_config(row: asyncpg.Record) -> ModelConfig:
    return ModelConfig(
        id=str(row["id"]),
        provider=row["provider"],
        model=row["model"],
        display_name=row["display_name"],
        context_limit=row["context_limit"],
        compression_threshold=row["compression_threshold"],
        options=json.loads(row["options"]),
    )


def _client_tools(raw: str | None) -> list[ToolSpec]:
    """The chat's client tools (a JSON array of definitions) as the model is offered them."""
    definitions: list[dict[str, Any]] = json.loads(raw) if raw is not None else []
    return [ToolSpec(d["name"], d.get("description", ""), d["input_schema"]) for d in definitions]


async def prompt_messages(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[Message]:
    """The prompt alone (after a compaction rewrote it)."""
    rows = await pool.fetch(Q.sql("runs_prompt_messages"), chat_id)
    return [Message.from_record(row) for row in rows]


async def lock_owned(conn: Conn, token: RunToken) -> asyncpg.Record:
    """The run's fence, first in every transaction a run writes in: the chat row, locked, while
    this run still owns it; FencedOut otherwise."""
    row = await conn.fetchrow(
        Q.sql("runs_lock_owned"), token.chat_id, token.worker_id, token.generation
    )
    if row is None:
        raise _fenced_out(token)
    return row


async def _made_progress(conn: Conn, locked: asyncpg.Record) -> None:
    """The run persisted something: reset the poison-chat guard's count (a statement skipped
    when the count is zero, the usual case)."""
    if locked["failed_runs"]:
        await conn.execute(Q.sql("runs_reset_failed_runs"), locked["id"])


async def check_owned(pool: asyncpg.Pool, token: RunToken) -> Chat:
    """The fence alone, in its own transaction: the row as this run owns it, or FencedOut."""
    async with transaction(pool) as conn:
        return Chat.from_record(await lock_owned(conn, token))


def _write_arrays(writes: Sequence[StepWrite]) -> list[list[Any]]:
    """The writes as the array arguments of runs_write_steps: per write its chat, model config,
    whether it ends the turn and whether it was interrupted; then every step's messages,
    flattened: the (1-based) write each belongs to, role, content, the four token counts and
    the cost. The assistant's message carries the step's usage and cost; the tool results'
    message none."""
    columns: list[list[Any]] = [[] for _ in range(12)]
    chat_ids, config_ids, ends, interrupted, owner, roles, contents = columns[:7]
    usage_columns = columns[7:]
    for n, write in enumerate(writes, start=1):
        chat_ids.append(write.token.chat_id)
        config_ids.append(write.model_config_id)
        ends.append(write.ends_turn)
        interrupted.append(write.interrupted)
        step = write.step
        if step is None:
            continue
        if step.assistant_content or step.tool_results:
            owner.append(n)
            roles.append("assistant")
            contents.append(json.dumps(step.assistant_content))
            usage = step.usage
            for column, value in zip(
                usage_columns,
                (
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_read_tokens,
                    usage.cache_write_tokens,
                    step.cost_micros,
                ),
                strict=True,
            ):
                column.append(value)
        if step.tool_results:
            owner.append(n)
            roles.append("tool")
            contents.append(json.dumps(step.tool_results))
            for column in usage_columns:
                column.append(0)
    return columns


async def write_steps(conn: Conn, writes: Sequence[StepWrite]) -> list[StepWritten | FencedOut]:
    """Inside the caller's transaction: the step writes of several runs in two statements for
    all of them (runs_lock_owned_many, then runs_write_steps, which says what each write does).
    Each write is fenced on its own: a run that lost its chat gets FencedOut in its place and
    nothing of it is written; the others go on. Progress: the poison-chat guard's count of
    every written chat starts again."""
    tokens = [write.token for write in writes]
    locked_rows = await conn.fetch(
        Q.sql("runs_lock_owned_many"),
        [token.chat_id for token in tokens],
        [token.worker_id for token in tokens],
        [token.generation for token in tokens],
    )
    # Keyed by token, not chat id: one replica may briefly run two generations of a chat.
    locked = {RunToken(row["id"], row["worker_id"], row["generation"]): row for row in locked_rows}
    written = await _write_locked(
        conn, [write for write in writes if write.token in locked], locked
    )
    return [written.get(token) or _fenced_out(token) for token in tokens]


async def _write_locked(
    conn: Conn, writes: Sequence[StepWrite], locked: dict[RunToken, asyncpg.Record]
) -> dict[RunToken, StepWritten]:
    """runs_write_steps for writes whose rows this transaction has locked (`locked`: the rows
    as locked, by token)."""
    if not writes:
        return {}
    rows = await conn.fetch(Q.sql("runs_write_steps"), *_write_arrays(writes))
    written: dict[RunToken, StepWritten] = {}
    for write, row in zip(writes, rows, strict=True):
        next_message = row["next_message"]
        written[write.token] = StepWritten(
            chat=Chat.from_record(row["chat"] or locked[write.token]),
            messages=[Message.from_record(message) for message in row["messages"]],
            next_message=Message.from_record(next_message) if next_message else None,
        )
    return written


def _fenced_out(token: RunToken) -> FencedOut:
    return FencedOut(
        "the run no longer owns its chat",
        detail=f"chat {token.chat_id} generation {token.generation}",
    )


async def write_step(pool: asyncpg.Pool, write: StepWrite) -> StepWritten:
    """One step write in a transaction of its own; FencedOut when the run lost its chat."""
    async with transaction(pool) as conn:
        (outcome,) = await write_steps(conn, [write])
    if isinstance(outcome, FencedOut):
        raise outcome
    return outcome


async def persist_step(
    pool: asyncpg.Pool, token: RunToken, step: StepRecord, *, model_config_id: uuid.UUID | None
) -> list[Message]:
    """A finished step becomes durable: its assistant message (+ a tool message with the tool
    results) are inserted and the chat's live parts deleted, in one fenced transaction, so a
    reader sees either the parts or the messages. The caller must first make sure no flush of
    this chat's parts can commit afterwards (PartFlusher.settle / discard). Progress: the
    poison-chat guard's count starts again. A replica's runs write through their group commit
    (app/engine/group_commit.py), which batches this write with others'."""
    write = StepWrite(token, step, model_config_id, ends_turn=False)
    return (await write_step(pool, write)).messages


async def require_action(
    pool: asyncpg.Pool,
    token: RunToken,
    step: StepRecord,
    pending_calls: list[dict[str, Any]],
    *,
    timeout_s: float,
    model_config_id: uuid.UUID | None,
) -> Chat | None:
    """The model called client tools: in one fenced transaction the step is persisted (its
    assistant message, and a tool message with the results of its server-side calls, if any)
    and the chat goes running -> requires_action with `pending_calls` and a deadline
    `timeout_s` from now; worker_id is cleared, so the run's slot is free and no replica owns
    the chat until the client answers (docs/requires_action.md).

    A Stop marked on the row wins: nothing is written and None is returned; the run then ends
    the turn as interrupted (the pending calls get "interrupted" results)."""
    async with transaction(pool) as conn:
        locked = await lock_owned(conn, token)
        if locked["interrupt_requested_at"] is not None:
            return None
        # The row is locked already (above): the step is written without a second lock.
        await _write_locked(
            conn, [StepWrite(token, step, model_config_id, ends_turn=False)], {token: locked}
        )
        row = await conn.fetchrow(
            Q.sql("runs_require_action"), token.chat_id, json.dumps(pending_calls), timeout_s
        )
        assert row is not None
        return Chat.from_record(row)


async def expire_actions(pool: asyncpg.Pool, *, limit: int = 100) -> list[Chat]:
    """The replicas' time-out of requires_action: up to `limit` chats whose deadline passed, in
    one transaction. Each pending call gets the error result TIMED_OUT_RESULT and the turn ends
    as any turn does: the queue's head (promoted first, then FIFO) becomes the next user message
    and the chat goes pending, or it goes waiting. Safe on several replicas at once (SKIP LOCKED
    in runs_lock_expired_actions)."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(Q.sql("runs_lock_expired_actions"), limit)
        ended: list[Chat] = []
        for row in rows:
            pending: list[dict[str, Any]] = json.loads(row["pending_tool_calls"])
            await conn.execute(
                Q.sql("runs_insert_tool_results"),
                row["id"],
                json.dumps(error_results(pending, TIMED_OUT_RESULT)),
            )
            next_message = await _pop_next_message(conn, row["id"], promoted_only=False)
            status = "pending" if next_message is not None else "waiting"
            updated = await conn.fetchrow(Q.sql("runs_end_action"), row["id"], status)
            assert updated is not None
            ended.append(Chat.from_record(updated))
        return ended


async def compact(
    pool: asyncpg.Pool,
    token: RunToken,
    *,
    compressed_ids: Sequence[int],
    summary_content: list[dict[str, Any]],
    usage: Usage,
    cost_micros: int,
    model_config_id: uuid.UUID | None,
) -> Message:
    """Compaction, in one fenced transaction: the summarized messages are marked compressed
    (left out of later prompts, kept in the history users see) and the summary is inserted as
    a `system` message carrying the summarizing call's usage and cost."""
    async with transaction(pool) as conn:
        await _made_progress(conn, await lock_owned(conn, token))
        await conn.execute(Q.sql("runs_compress_messages"), token.chat_id, list(compressed_ids))
        rows = await conn.fetch(
            Q.sql("runs_insert_messages"),
            token.chat_id,
            model_config_id,
            ["system"],
            [json.dumps(summary_content)],
            [usage.input_tokens],
            [usage.output_tokens],
            [usage.cache_read_tokens],
            [usage.cache_write_tokens],
            [cost_micros],
        )
        return Message.from_record(rows[0])


async def set_generated_title(
    pool: asyncpg.Pool, chat_id: uuid.UUID, *, fallback: str, title: str
) -> Chat | None:
    """Replace the fallback title by a generated one, unless the title changed meanwhile (then
    None). Not fenced: metadata, written after the turn it describes has ended."""
    row = await pool.fetchrow(Q.sql("runs_set_generated_title"), chat_id, fallback, title)
    return Chat.from_record(row) if row is not None else None


async def void_step(
    pool: asyncpg.Pool,
    token: RunToken,
    control_part: dict[str, Any],
    *,
    role: PartRole = "system",
    usage: UsageRecord | None = None,
) -> int:
    """A step is being retried: its live parts are void. Delete them and write one control part
    (e.g. `{"type": "retry", ...}`) so stream readers learn why they vanished; returns its id.
    `usage`: what the provider reported for the failed attempt (it is spend all the same)."""
    async with transaction(pool) as conn:
        await lock_owned(conn, token)
        await conn.execute(Q.sql("runs_delete_parts"), token.chat_id)
        if usage is not None:
            await record_usage(conn, token.chat_id, usage)
        part_id: int = await conn.fetchval(
            Q.sql("runs_insert_control_part"),
            token.chat_id,
            token.generation,
            role,
            json.dumps(control_part),
        )
        return part_id


async def _pop_next_message(
    conn: Conn, chat_id: uuid.UUID, *, promoted_only: bool
) -> Message | None:
    queued = await conn.fetchrow(Q.sql("runs_pop_queue_head"), chat_id, promoted_only)
    if queued is None:
        return None
    row = await conn.fetchrow(Q.sql("runs_insert_user_message"), chat_id, queued["content"])
    assert row is not None
    return Message.from_record(row)


async def end_turn(
    pool: asyncpg.Pool,
    token: RunToken,
    *,
    interrupted: bool,
    step: StepRecord | None = None,
    model_config_id: uuid.UUID | None = None,
) -> StepWritten:
    """The end of a turn, in one fenced transaction (runs_write_steps says what it does):

    - `step` (the turn's last step, or an interrupted step's output so far) is persisted
      first, and the chat's live parts are deleted.
    - Then the queue decides. Normally its head (promoted first, then FIFO) becomes the next user
      message and the run goes on (the chat stays running). After a Stop (the run was
      interrupted, or the mark arrived while the turn was ending) only a *promoted* message may
      continue the run: that is how "send this queued message now" works on a running chat.
    - With nothing to continue: -> waiting, the Stop mark cleared.

    A replica's runs end their turns through their group commit (app/engine/group_commit.py),
    which batches this write with others'."""
    write = StepWrite(token, step, model_config_id, ends_turn=True, interrupted=interrupted)
    written = await write_step(pool, write)
    assert written.next_message is not None or written.chat.status == "waiting"
    return written


async def _give_back(
    conn: Conn, chat_id: uuid.UUID, *, stop_requested: bool, failed: bool = False
) -> asyncpg.Record:
    """A run that will not finish hands its chat on. Without a Stop, -> pending: another run
    redoes the unfinished step (completed steps are kept). With a Stop, the user's wish wins:
    -> waiting, unless a promoted queued message was waiting to be sent, which becomes the next
    user message (-> pending) just as the owning run would have done it. `failed`: the run
    crashed or its replica died, which the poison-chat guard counts."""
    status = "pending"
    if stop_requested and await _pop_next_message(conn, chat_id, promoted_only=True) is None:
        status = "waiting"
    row = await conn.fetchrow(Q.sql("runs_release"), chat_id, status, 1 if failed else 0)
    assert row is not None
    return row


async def requeue(pool: asyncpg.Pool, token: RunToken) -> Chat:
    """Graceful shutdown or lost liveness: give the chat back (fenced), drop its live parts. The
    caller discards its buffered parts first."""
    async with transaction(pool) as conn:
        row = await lock_owned(conn, token)
        await conn.execute(Q.sql("runs_delete_parts"), token.chat_id)
        released = await _give_back(
            conn, token.chat_id, stop_requested=row["interrupt_requested_at"] is not None
        )
        return Chat.from_record(released)


async def fail(
    pool: asyncpg.Pool,
    token: RunToken,
    error: dict[str, Any],
    *,
    usage: UsageRecord | None = None,
) -> Chat:
    """running -> error with a structured last_error (the classified provider error), and the
    usage the provider reported for the failed attempt, if any."""
    async with transaction(pool) as conn:
        await lock_owned(conn, token)
        await conn.execute(Q.sql("runs_delete_parts"), token.chat_id)
        if usage is not None:
            await record_usage(conn, token.chat_id, usage)
        row = await conn.fetchrow(Q.sql("runs_fail"), token.chat_id, json.dumps(error))
        assert row is not None
        return Chat.from_record(row)


def poison_error(failed_runs: int) -> dict[str, Any]:
    """The last_error of a chat the poison-chat guard stopped (the shape of a classified error;
    no exception text: the user sees it, the log line with the chat id has the details)."""
    return {
        "kind": "poison",
        "provider": "chatd",
        "retryable": False,
        "message": (
            f"the chat failed on {failed_runs} acquisitions in a row without progress (its run"
            " crashed or its replica died); it is not retried until a new message"
        ),
        "status_code": None,
        "retry_after_s": None,
        "detail": None,
    }


async def give_back_failed(pool: asyncpg.Pool, token: RunToken, *, max_failed_runs: int) -> Chat:
    """The run crashed (anything but a database outage): count it against the poison-chat
    guard, in one fenced transaction. Under `max_failed_runs` the chat goes back as on a
    requeue (another run tries again); at it, the chat ends in `error` with kind "poison"."""
    async with transaction(pool) as conn:
        row = await lock_owned(conn, token)
        await conn.execute(Q.sql("runs_delete_parts"), token.chat_id)
        return Chat.from_record(
            await _fail_or_give_back(
                conn,
                token.chat_id,
                failed_runs=row["failed_runs"] + 1,
                stop_requested=row["interrupt_requested_at"] is not None,
                max_failed_runs=max_failed_runs,
            )
        )


async def _fail_or_give_back(
    conn: Conn,
    chat_id: uuid.UUID,
    *,
    failed_runs: int,
    stop_requested: bool,
    max_failed_runs: int,
    counts: bool = True,
) -> asyncpg.Record:
    """`failed_runs`: the count including this run when it `counts` toward the guard."""
    if counts and failed_runs >= max_failed_runs:
        row = await conn.fetchrow(
            Q.sql("runs_fail"), chat_id, json.dumps(poison_error(failed_runs))
        )
        assert row is not None
        return row
    return await _give_back(conn, chat_id, stop_requested=stop_requested, failed=counts)


async def requeue_orphans(
    conn: Conn,
    gone_worker_ids: Sequence[uuid.UUID],
    *,
    orphan_grace_s: float,
    max_failed_runs: int = DEFAULT_MAX_FAILED_RUNS,
) -> list[Chat]:
    """Inside the caller's transaction: give back the running chats of replicas that are gone
    (and of no replica at all for longer than `orphan_grace_s`). Safe when several replicas do
    it at once: each chat is locked, and whoever comes second finds it no longer running. A
    replica that died while running a chat counts as a failed run of it (a chat that kills
    every replica that runs it ends in `error`, kind "poison", at `max_failed_runs`), unless
    the run began before the database server's last start (it died with the server)."""
    rows = await conn.fetch(Q.sql("runs_lock_orphans"), list(gone_worker_ids), orphan_grace_s)
    if not rows:
        return []
    chat_ids = [row["id"] for row in rows]
    await conn.execute(Q.sql("runs_delete_parts_of"), chat_ids)
    return [
        Chat.from_record(
            await _fail_or_give_back(
                conn,
                row["id"],
                failed_runs=row["failed_runs"] + 1,
                stop_requested=row["stop_requested"],
                max_failed_runs=max_failed_runs,
                counts=row["counts"],
            )
        )
        for row in rows
    ]


async def requeue_unrun(conn: Conn, worker_id: uuid.UUID, live: Sequence[RunToken]) -> list[Chat]:
    """Inside the caller's transaction: give back the running chats of `worker_id` that none of
    its `live` runs drives (pending, or waiting when a Stop was asked)."""
    rows = await conn.fetch(
        Q.sql("runs_lock_unrun"),
        worker_id,
        [token.chat_id for token in live],
        [token.generation for token in live],
    )
    if not rows:
        return []
    await conn.execute(Q.sql("runs_delete_parts_of"), [row["id"] for row in rows])
    return [
        Chat.from_record(await _give_back(conn, row["id"], stop_requested=row["stop_requested"]))
        for row in rows
    ]
