"""The chat loop of one run (docs/engine.md, "The chat loop"): build the prompt, stream one
model step, write its live parts through the replica's flusher, run its tool calls, persist
the step (fenced), repeat while the model asks for tools (up to a step limit), then end the
turn, which may pop a queued message and go on. A step that calls client-side tools ends the
run instead: the step is persisted and the chat waits for its client (`requires_action`,
docs/requires_action.md); the client's results make it pending, and a later run goes on.

Cancellation is information. A run is stopped for one of four causes (`StopCause`), always set
*before* anything is cancelled:

- interrupt: the user pressed Stop. Only the step in progress is cancelled; the run persists the
  partial output (tool calls without a result get a synthetic "interrupted" one) and ends the
  turn (a promoted queued message continues the run, otherwise -> waiting).
- shutdown: the replica is stopping. The step is cancelled; completed steps are kept, the
  partial one is dropped, and the chat goes back to pending (one shielded, fenced write).
- liveness_lost: the replica cannot prove it is alive; like shutdown (the write is fenced, so it
  does nothing if another replica already took the chat).
- lost_ownership: the row says the run no longer owns the chat (edited, archived, requeued,
  re-acquired). The run stops and writes nothing.

The step runs in a task of its own, so an interrupt cancels the step and never the run; the run
tells why the step ended from the cause, not from the exception type. The run itself is only
cancelled from outside as a last resort (the shutdown grace period ran out), and then never
swallows the CancelledError.

The provider is called through one seam, `RunDeps.stream_step` (app/engine/step.py). Two more
model calls go through it. Compaction (app/engine/compaction.py): before a step, when the
context reached the model's threshold, the run has the older messages summarized and, in one
fenced write, marks them compressed and inserts the summary. Title (app/engine/titles.py): after
the first turn, a best-effort request for a short title replaces the fallback title if nobody
changed it meanwhile; it never fails or delays the turn."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from app import instruments
from app.aio import Backoff
from app.db.failures import is_outage
from app.db.listener import Event, Listener, Resync
from app.engine import compaction, titles
from app.engine.context_reader import StepContextReader
from app.engine.group_commit import GroupCommitter
from app.engine.parts import PartFlusher
from app.engine.prompt import build_request, first_question, history_view, text_of
from app.engine.step import (
    StepOutput,
    StepStreamer,
    collect_text,
    step_cost_micros,
    stream_once,
    tool_result_part,
)
from app.errors import FencedOut
from app.log import get_logger
from app.providers.base import (
    ClassifiedError,
    ModelConfig,
    Provider,
    ProviderError,
    ReasoningDelta,
    StepFinished,
    TextDelta,
    ToolCall,
    Usage,
    UsageMeter,
)
from app.providers.catalog import provider_for
from app.providers.retry import RetryInfo
from app.state import runs
from app.state.client_tools import pending_call
from app.state.model import Chat, Message, Owner, default_title
from app.state.runs import (
    RunToken,
    StepContext,
    StepRecord,
    StepWrite,
    UsageKind,
    UsageRecord,
)
from app.text import storable, storable_json
from app.tools.registry import DEFAULT_MAX_CHILDREN, DEFAULT_QUEUE_LIMIT, ToolContext
from app.tools.toolset import ToolCatalog

log = get_logger(__name__)


# Bound of the shielded give-back write of a stopping run.
GIVE_BACK_TIMEOUT_S = 5.0


# Bound of the best-effort title request (one attempt, never retried).
TITLE_TIMEOUT_S = 30.0


# Bound of one re-read of the chat row after a listener resync; the watcher tries again (with a
# growing pause) until RESYNC_GIVE_UP_S, then gives the chat back rather than run blind.
RESYNC_READ_TIMEOUT_S = 5.0


RESYNC_GIVE_UP_S = 30.0


class StopCause(enum.IntEnum):
    """Why a run (or its step) is being stopped. A stronger cause replaces a weaker one."""

    INTERRUPT = 1
    SHUTDOWN = 2
    LIVENESS_LOST = 3
    LOST_OWNERSHIP = 4

    @property
    def label(self) -> str:
        return self.name.lower()


class RunEnd(enum.Enum):
    """How a run ended, for the replica's stats, logs and tests."""

    WAITING = "waiting"  # the turn ended, the user's turn (possibly after an interrupt)
    FAILED = "failed"  # a terminal provider error: status error
    REQUEUED = "requeued"  # shutdown / lost liveness: given back to pending
    LOST = "lost"  # lost ownership or fenced out: wrote nothing more
    REQUIRES_ACTION = "requires_action"  # client tools called: the chat waits for its client


@dataclass(frozen=True)
class RunDeps:
    """What a run needs from its replica."""

    pool: asyncpg.Pool
    listener: Listener
    flusher: PartFlusher
    commits: GroupCommitter  # the step writes (persist step, end turn) of all the runs
    contexts: StepContextReader  # the step-context reads of all the runs
    tools: ToolCatalog  # every source of tools; a step's set is `tools.for_step(context)`
    max_steps_per_turn: int
    stream_step: StepStreamer = stream_once
    provider_for: Callable[[ModelConfig], Provider] = provider_for
    queue_limit: int = DEFAULT_QUEUE_LIMIT  # of a child chat, for message_agent
    max_children_per_chat: int = DEFAULT_MAX_CHILDREN  # open sub-agents, for spawn_agent
    # How long a chat waits in requires_action for its client (Settings).
    requires_action_timeout_s: float = 300.0


class Run:
    """One acquired chat, driven until its turn(s) end or it is stopped."""

    def __init__(self, chat: Chat, deps: RunDeps) -> None:
        self.token: RunToken = runs.token_of(chat)
        self.chat_id = chat.id
        self._owner = Owner(user_id=chat.owner_id, organization_id=chat.organization_id)
        self._is_child = chat.parent_chat_id is not None
        self._title = chat.title  # as acquired; the title update is guarded anyway
        self._deps = deps
        self._tool_context = ToolContext(
            chat_id=chat.id,
            worker_id=self.token.worker_id,
            generation=self.token.generation,
            owner=self._owner,
            parent_chat_id=chat.parent_chat_id,
            pool=deps.pool,
            listener=deps.listener,
            queue_limit=deps.queue_limit,
            max_children=deps.max_children_per_chat,
        )
        # The first user message, while the turn that answers it runs (then: a title is due).
        self._title_question: list[dict[str, Any]] | None = None
        self._title_task: asyncio.Task[None] | None = None
        self._config: ModelConfig | None = None  # known once the run has loaded it
        self._provider: Provider | None = None
        self.cause: StopCause | None = None
        self._step_task: asyncio.Task[None] | None = None
        self._step_output: StepOutput | None = None  # the step in progress (or just ended)
        self._version = chat.version  # the newest row version this run has seen
        self._interrupt_version = 0  # version at which the newest Stop mark was seen
        self._handled_version = 0  # row version after the run last honoured a Stop
        self.steps_persisted = 0
        self._releasing = False  # the run's last write (release/fail/requeue) is under way
        self._resync_due = asyncio.Event()  # the listener resynced: the row must be re-read
        self._log = {
            "chat_id": chat.id,
            "replica_id": self.token.worker_id,
            "generation": self.token.generation,
        }

    # --- control from outside (the watcher, the replica) ----------------------------------

    def stop(self, cause: StopCause) -> None:
        """Ask the run to stop for `cause`: recorded first, then the step in progress (if any)
        is cancelled. The run finishes its current write, if any, and acts on the cause."""
        if cause != StopCause.INTERRUPT and (self.cause is None or cause > self.cause):
            self.cause = cause
        if self._step_task is not None and not self._step_task.done():
            self._step_task.cancel()
        # A title in flight is metadata: it survives an interrupt and the loss of the chat (the
        # notification of the run's own release says "not owned" too), not a stopping replica.
        if cause in (StopCause.SHUTDOWN, StopCause.LIVENESS_LOST) and self._title_task is not None:
            self._title_task.cancel()

    @property
    def interrupt_pending(self) -> bool:
        return self._interrupt_version > self._handled_version

    def _interrupt_pending(self) -> bool:
        # A method for the loop, so that the type checker does not narrow it across awaits.
        return self.interrupt_pending

    def stop_cause(self) -> StopCause | None:
        """The cause to act on (a method, not an attribute: it changes across every await)."""
        return self.cause

    def _observe(self, *, version: int, owned: bool, interrupt_requested: bool) -> None:
        """Apply one observation of the chat row (a notification or a read), newest wins."""
        if version <= self._version:
            return
        self._version = version
        if not owned:
            # The notification of the run's own last write (the chat released) says "not
            # owned" too; that is no news worth a log line.
            if self.cause != StopCause.LOST_OWNERSHIP and not self._releasing:
                log.info("run.ownership_lost", version=version, **self._log)
            self.stop(StopCause.LOST_OWNERSHIP)
        elif interrupt_requested and version > self._handled_version:
            self._interrupt_version = version
            log.info("run.interrupt_requested", version=version, **self._log)
            self.stop(StopCause.INTERRUPT)

    def _observe_chat(self, chat: Chat | None) -> None:
        if chat is None:
            self._version = max(self._version, 1) + 1
            self.stop(StopCause.LOST_OWNERSHIP)
            return
        self._observe(
            version=chat.version,
            owned=runs.owns(chat, self.token),
            interrupt_requested=chat.interrupt_requested,
        )

    def _on_event(self, event: Event) -> None:
        """Each event of the chat's channel, as it arrives (Listener handler: no task wakes for
        the many notifications a run does not act on, such as its own parts and messages).
        Interrupts and loss of ownership reach the run here; a resync is the watcher's."""
        if isinstance(event, Resync):
            self._resync_due.set()
            return
        payload = orjson.loads(event.payload)
        kind = payload.get("type")
        if kind == "deleted":
            self.stop(StopCause.LOST_OWNERSHIP)
        elif kind == "chat":
            self._observe(
                version=int(payload["version"]),
                owned=payload.get("status") == "running"
                and payload.get("worker_id") == str(self.token.worker_id)
                and int(payload.get("generation", -1)) == self.token.generation,
                interrupt_requested=bool(payload.get("interrupt_requested")),
            )

    async def _watch(self) -> None:
        """Re-read the row after every listener resync (a notification may have been lost)."""
        try:
            while True:
                await self._resync_due.wait()
                self._resync_due.clear()
                self._observe_chat(await self._resync_read())
        except Exception as exc:
            # Without a watcher the run would be deaf to Stop and to loss of ownership: give
            # the chat back rather than run blind.
            log.error("run.watch_failed", error=repr(exc), exc_info=True, **self._log)
            self.stop(StopCause.SHUTDOWN)

    async def _resync_read(self) -> Chat | None:
        """Re-read the row after a listener resync, each read bounded by a deadline. A stalled
        or unreachable database is retried with a growing pause (the run's writes are fenced
        meanwhile, so running on is safe); past RESYNC_GIVE_UP_S the watcher fails, and the
        run gives the chat back rather than run deaf to Stop and to loss of ownership."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + RESYNC_GIVE_UP_S
        backoff = Backoff(initial_s=0.1, max_s=RESYNC_READ_TIMEOUT_S)
        while True:
            try:
                async with asyncio.timeout(RESYNC_READ_TIMEOUT_S):
                    return await runs.read_chat(self._deps.pool, self.chat_id)
            except Exception as exc:
                backoff.grow()
                if not is_outage(exc) or loop.time() + backoff.delay_s >= give_up_at:
                    raise
                log.warning(
                    "run.resync_failed", error=repr(exc), retry_in_s=backoff.delay_s, **self._log
                )
            await asyncio.sleep(backoff.delay_s)

    # --- the loop --------------------------------------------------------------------------

    async def execute(self) -> RunEnd:
        try:
            end = await self._execute()
        except BaseException:
            if self._title_task is not None:
                self._title_task.cancel()
            raise
        finally:
            await self._join_title()
        log.info("run.ended", end=end.value, steps=self.steps_persisted, **self._log)
        return end

    async def _join_title(self) -> None:
        """The run ends when its title request has (bounded by TITLE_TIMEOUT_S)."""
        task = self._title_task
        if task is None:
            return
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def _execute(self) -> RunEnd:
        deps = self._deps
        log.info("run.started", **self._log)
        try:
            async with deps.listener.subscribe(f"chat:{self.chat_id}", handler=self._on_event):
                watcher = asyncio.create_task(self._watch(), name=f"run-watch:{self.chat_id}")
                try:
                    # Subscribed first, read second: a Stop (or a takeover) that raced the
                    # acquire is in this row or in a notification after it, never lost. The
                    # same statement reads what the first step starts from.
                    context = await deps.contexts.read(self.chat_id)
                    self._observe_chat(context.chat if context is not None else None)
                    end = await self._drive(context)
                finally:
                    watcher.cancel()
                    await asyncio.wait({watcher})
        except FencedOut:
            log.info("run.fenced_out", **self._log)
            instruments.TURNS.labels(outcome="lost").inc()
            end = RunEnd.LOST
        finally:
            self._step_task = None
            # Whatever is still buffered belongs to a run that is over; a flush in flight is
            # fenced in SQL.
            deps.flusher.drop(self.token)
        return end

    async def _drive(self, context: StepContext | None) -> RunEnd:
        if self.stop_cause() is not None or context is None:
            return await self._abandon()
        # The run keeps the model config it started with (a send that changes the chat's model
        # takes effect on the next run).
        config = context.config
        try:
            provider = self._deps.provider_for(config)
        except ProviderError as exc:
            return await self._fail(exc.error)
        model_config_id = uuid.UUID(config.id)
        self._config, self._provider = config, provider
        first: StepContext | None = context
        while True:
            end = await self._turn(config, provider, model_config_id, first)
            if end is not None:
                return end
            first = None

    async def _turn(  # noqa: PLR0911, PLR0912  each way a step can end the turn, in order
        self,
        config: ModelConfig,
        provider: Provider,
        model_config_id: uuid.UUID,
        first: StepContext | None,
    ) -> RunEnd | None:
        """One user turn: steps until the model stops calling tools (or calls a client's). None
        when a queued message continues the run with another turn. `first`: the context of the
        turn's first step when the run's start already read it."""
        deps = self._deps
        final: StepRecord | None = None
        for step_number in range(1, deps.max_steps_per_turn + 1):
            if self.stop_cause() is not None:
                return await self._abandon()
            if self._interrupt_pending():
                return await self._end_turn(None, model_config_id, interrupted=True)
            context, first = first or await deps.contexts.read(self.chat_id), None
            if context is None:  # the chat was deleted
                self._observe_chat(None)
                return await self._abandon()
            self._observe_chat(context.chat)
            if step_number == 1:
                self._title_question = first_question(context.messages)
            output = StepOutput()
            step = await self._run_step(config, provider, context, output, step_number)
            instruments.STEPS.labels(outcome=_step_outcome(step, output, self.stop_cause())).inc()
            if step.cancelled():
                if self.stop_cause() is not None:
                    return await self._abandon()
                if self._interrupt_pending():
                    partial = output.record(config, interrupted=True)
                    if partial.is_empty:
                        # No message will carry it (nothing to persist), but it was spent.
                        await self._record_spend("interrupted", partial.usage)
                    return await self._end_turn(partial, model_config_id, interrupted=True)
                raise RuntimeError("a step was cancelled without a cause")
            error = step.exception()
            if isinstance(error, ProviderError):
                return await self._fail(error.error, spent=output.meter.take())
            if error is not None:
                raise error

            record = output.record(config)
            if not output.tool_calls:
                final = record
                break
            await deps.flusher.settle(self.token)
            if output.client_calls:
                return await self._require_action(config, output, record, model_config_id)
            await deps.commits.write(
                StepWrite(self.token, record, model_config_id, ends_turn=False)
            )
            self.steps_persisted += 1
            log.info("run.step_persisted", step=step_number, **self._log)
        else:
            log.info("run.step_limit", steps=deps.max_steps_per_turn, **self._log)
        # A step that completed is kept whatever stop arrived meanwhile: ending the turn is as
        # good a hand-over as a requeue (and a run that lost its chat is fenced out here).
        return await self._end_turn(final, model_config_id, interrupted=self._interrupt_pending())

    async def _require_action(
        self,
        config: ModelConfig,
        output: StepOutput,
        record: StepRecord,
        model_config_id: uuid.UUID,
    ) -> RunEnd | None:
        """The step called client-side tools (its server-side calls have run): persist it and
        hand the chat to its client (requires_action), ending the run. A Stop that arrived
        meanwhile wins: the turn ends as interrupted, the client calls answered "interrupted"."""
        if self._interrupt_pending():
            interrupted = output.record(config, interrupted=True)
            return await self._end_turn(interrupted, model_config_id, interrupted=True)
        pending = [pending_call(call.id, call.name, call.args) for call in output.client_calls]
        self._releasing = True
        chat = await runs.require_action(
            self._deps.pool,
            self.token,
            record,
            pending,
            timeout_s=self._deps.requires_action_timeout_s,
            model_config_id=model_config_id,
        )
        if chat is None:  # a Stop marked on the row before the write could lock it
            self._releasing = False
            interrupted = output.record(config, interrupted=True)
            return await self._end_turn(interrupted, model_config_id, interrupted=True)
        self.steps_persisted += 1
        # The turn is not over: the run that continues it asks for the title when it ends.
        self._title_question = None
        log.info("run.requires_action", calls=len(pending), **self._log)
        instruments.TURNS.labels(outcome="requires_action").inc()
        return RunEnd.REQUIRES_ACTION

    async def _run_step(
        self,
        config: ModelConfig,
        provider: Provider,
        context: StepContext,
        output: StepOutput,
        step_number: int,
    ) -> asyncio.Task[None]:
        """Run one step as a task that a stop or an interrupt can cancel; return it ended."""
        self._step_output = output
        step = asyncio.create_task(
            self._step(config, provider, context, output),
            name=f"run-step:{self.chat_id}:{self.token.generation}:{step_number}",
        )
        self._step_task = step
        if self.stop_cause() is not None or self._interrupt_pending():
            step.cancel()  # a stop that arrived while the prompt was being read
        try:
            await asyncio.wait({step})
        finally:
            # Only when this run itself is cancelled (the shutdown grace ran out) is the
            # step still going here.
            if not step.done():
                step.cancel()
                await asyncio.wait({step})
            self._step_task = None
        return step

    async def _step(
        self, config: ModelConfig, provider: Provider, context: StepContext, output: StepOutput
    ) -> None:
        """Compact the history if it is due, stream one model step, then run its tool calls;
        live parts go to the flusher."""
        flusher = self._deps.flusher

        loop = asyncio.get_running_loop()
        attempt_started: float | None = None  # None once the attempt's first delta came

        async def on_retry(notice: RetryInfo) -> None:
            nonlocal attempt_started
            instruments.RETRIES.labels(provider=config.provider, kind=notice.error.kind).inc()
            attempt_started = loop.time()
            # The attempt's parts are void: nothing of it may be flushed after the control part.
            output.content.clear()
            output.tool_calls.clear()
            output.finished = None
            await flusher.discard(self.token)
            await runs.void_step(
                self._deps.pool,
                self.token,
                {"type": "retry", **storable_json(notice.as_json())},
                usage=self._usage_record("failed_attempt", output.meter.take()),
            )
            log.info("run.retrying", attempt=notice.attempt, kind=notice.error.kind, **self._log)

        history = await self._compact(config, provider, context.messages, on_retry, output.meter)
        # The step's tools, every source merged (app/tools/toolset.py): offered, and the
        # server-side ones executed here.
        tools = await self._deps.tools.for_step(context)
        request = dataclasses.replace(
            build_request(
                config,
                history,
                tools.registry,
                for_child=self._is_child,
                client_tools=tools.client,
            ),
            meter=output.meter,
        )
        # Model and tool output is stored as it came, except for what PostgreSQL cannot store
        # (NUL, lone surrogates): app/text.py.
        step_started = attempt_started = loop.time()
        async for event in self._deps.stream_step(provider, request, on_retry=on_retry):
            if attempt_started is not None and isinstance(
                event, TextDelta | ReasoningDelta | ToolCall
            ):
                instruments.TIME_TO_FIRST_TOKEN.labels(provider=config.provider).observe(
                    loop.time() - attempt_started
                )
                attempt_started = None
            if isinstance(event, TextDelta):
                text = storable(event.text)
                output.add_delta("text", text)
                # offer(): no await per delta while the buffer has room; add() waits for it.
                part = {"type": "text", "text": text}
                if not flusher.offer(self.token, "assistant", part):
                    await flusher.add(self.token, "assistant", part)
            elif isinstance(event, ReasoningDelta):
                text = storable(event.text)
                output.add_delta("reasoning", text, storable(event.signature))
                part = {"type": "reasoning", "text": text}
                if text and not flusher.offer(self.token, "assistant", part):
                    await flusher.add(self.token, "assistant", part)
            elif isinstance(event, ToolCall):
                call = ToolCall(
                    id=storable(event.id), name=storable(event.name), args=storable_json(event.args)
                )
                await flusher.add(self.token, "assistant", output.add_tool_call(call))
            elif isinstance(event, StepFinished):
                output.finished = event
                output.meter.take()  # the final usage is the StepFinished's
        instruments.STEP_DURATION.labels(provider=config.provider).observe(
            loop.time() - step_started
        )

        client_names = tools.client_names
        for call in output.tool_calls:
            if call.name in client_names:
                output.client_calls.append(call)  # the chat's client runs it
                continue
            outcome = await tools.registry.call(call.name, call.args, self._tool_context)
            result = storable_json(outcome.result)
            part = tool_result_part(call, result, is_error=outcome.is_error)
            output.tool_results.append(part)
            await flusher.add(self.token, "tool", part)

    async def _compact(
        self,
        config: ModelConfig,
        provider: Provider,
        history: list[Message],
        on_retry: Callable[[RetryInfo], Awaitable[None]],
        meter: UsageMeter,
    ) -> list[Message]:
        """When the context reached the model's threshold: summarize everything before the
        current turn with the chat's model, then in ONE fenced transaction mark it compressed and
        insert the summary. Returns the history the step's prompt is built from. A provider
        error here ends the step like any other (the chat goes to `error`)."""
        view = history_view(history)
        if not compaction.needs_compaction(config, view):
            return history
        compacted = compaction.messages_to_compact(view)
        request = dataclasses.replace(compaction.summary_request(config, compacted), meter=meter)
        summary, usage = await collect_text(
            self._deps.stream_step(provider, request, on_retry=on_retry)
        )
        if not summary.strip():
            log.warning("run.compaction_empty", **self._log)
            return history
        await runs.compact(
            self._deps.pool,
            self.token,
            compressed_ids=[m.id for m in compacted],
            summary_content=[compaction.summary_part(summary.strip(), compacted)],
            usage=usage,
            cost_micros=step_cost_micros(config, usage),
            model_config_id=uuid.UUID(config.id),
        )
        meter.take()  # the summary's usage is on the summary message
        log.info("run.compacted", messages=len(compacted), **self._log)
        return await runs.prompt_messages(self._deps.pool, self.chat_id)

    def _start_title(self, question: list[dict[str, Any]], step: StepRecord | None) -> None:
        """After the first turn: a generated title, if the model has a notion of one and the
        title is still the fallback. Runs next to the rest of the run (a queued message goes on
        at once); the run ends when it has."""
        config, provider = self._config, self._provider
        assert config is not None and provider is not None, "a turn ended before the run began"
        if self.stop_cause() in (StopCause.SHUTDOWN, StopCause.LIVENESS_LOST):
            return  # the replica is going away; the fallback stays
        fallback = default_title(question)
        if not titles.wants_generated_title(config) or self._title != fallback:
            return
        answer = text_of(step.assistant_content) if step is not None else ""
        self._title_task = asyncio.create_task(
            self._generate_title(config, provider, text_of(question), answer, fallback),
            name=f"run-title:{self.chat_id}",
        )

    async def _generate_title(
        self, config: ModelConfig, provider: Provider, question: str, answer: str, fallback: str
    ) -> None:
        """Best effort: one attempt, bounded; any failure keeps the fallback title."""
        meter = UsageMeter()
        request = dataclasses.replace(titles.title_request(config, question, answer), meter=meter)

        async def give_up(notice: RetryInfo) -> None:
            raise ProviderError(notice.error)  # a title is not worth a retry loop

        spent: Usage | None = None
        try:
            async with asyncio.timeout(TITLE_TIMEOUT_S):
                raw, spent = await collect_text(
                    self._deps.stream_step(provider, request, on_retry=give_up)
                )
                meter.take()
                title = titles.clean_title(raw)
                if not title:
                    log.info("run.title_failed", reason="empty", **self._log)
                    return
                updated = await runs.set_generated_title(
                    self._deps.pool, self.chat_id, fallback=fallback, title=title
                )
        except Exception as exc:  # a provider error, the timeout, database trouble
            log.info("run.title_failed", error=repr(exc), **self._log)
            return
        finally:
            # A title request is spend like any other (chat_usage, kind "title"), also when it
            # failed after the provider reported usage. Shielded: the run may be cancelled.
            with contextlib.suppress(Exception):
                spend = spent if spent is not None else meter.take()
                await asyncio.shield(self._record_spend("title", spend))
        log.info("run.title_generated", kept_user_title=updated is None, **self._log)

    async def _end_turn(
        self, step: StepRecord | None, model_config_id: uuid.UUID, *, interrupted: bool
    ) -> RunEnd | None:
        # A Stop waits for this end: the flush window is cut short rather than waited out.
        await self._deps.flusher.settle(self.token, urgent=interrupted)
        self._releasing = True
        outcome = await self._deps.commits.write(
            StepWrite(self.token, step, model_config_id, ends_turn=True, interrupted=interrupted)
        )
        # No await between the write and this: any Stop seen after it is a new one.
        self._handled_version = max(self._handled_version, outcome.chat.version)
        self._version = max(self._version, outcome.chat.version)
        instruments.TURNS.labels(outcome="interrupted" if interrupted else "answered").inc()
        if step is not None and not step.is_empty:
            self.steps_persisted += 1
        self._releasing = outcome.next_message is None
        question, self._title_question = self._title_question, None
        if question is not None:
            self._start_title(question, step)
        if outcome.next_message is None:
            log.info("run.turn_ended", interrupted=interrupted, **self._log)
            return RunEnd.WAITING
        log.info(
            "run.next_message",
            message_id=outcome.next_message.id,
            interrupted=interrupted,
            **self._log,
        )
        return None

    async def _fail(self, error: ClassifiedError, *, spent: Usage | None = None) -> RunEnd:
        """A terminal provider error: the chat ends in `error`; `spent` is what the provider
        reported for the failed attempt (recorded as spend in the same transaction)."""
        log.warning("run.provider_error", kind=error.kind, error=error.message, **self._log)
        await self._deps.flusher.discard(self.token)
        self._releasing = True
        await runs.fail(
            self._deps.pool,
            self.token,
            storable_json(error.as_json()),
            usage=self._usage_record("failed_attempt", spent),
        )
        instruments.TURNS.labels(outcome="failed").inc()
        return RunEnd.FAILED

    def _usage_record(self, kind: UsageKind, usage: Usage | None) -> UsageRecord | None:
        """Usage no message will carry, as a chat_usage row (None when there is none)."""
        config = self._config
        if usage is None or config is None or usage == Usage():
            return None
        return UsageRecord(
            kind=kind,
            usage=usage,
            cost_micros=step_cost_micros(config, usage),
            model_config_id=uuid.UUID(config.id),
        )

    async def _record_spend(self, kind: UsageKind, usage: Usage | None) -> None:
        """Best effort, outside any fenced write (a run that lost its chat still spent it)."""
        record = self._usage_record(kind, usage)
        if record is None:
            return
        try:
            await runs.record_usage(self._deps.pool, self.chat_id, record)
        except Exception as exc:
            # Never worth failing the run for: logged with what was lost.
            log.warning(
                "run.usage_not_recorded",
                kind=kind,
                cost_micros=record.cost_micros,
                outage=is_outage(exc),
                error=repr(exc),
                **self._log,
            )

    async def _abandon(self) -> RunEnd:
        """Act on a stop cause other than interrupt."""
        cause = self.stop_cause()
        assert cause is not None
        await self._deps.flusher.discard(self.token)
        output, self._step_output = self._step_output, None
        if output is not None and output.finished is None:
            # The step in progress is dropped, but what the provider reported was spent.
            await self._record_spend("abandoned", output.meter.take())
        if cause == StopCause.LOST_OWNERSHIP:
            log.info("run.stopped", cause=cause.label, **self._log)
            instruments.TURNS.labels(outcome="lost").inc()
            return RunEnd.LOST
        self._releasing = True
        # Shutdown or lost liveness: hand the chat on. This is the one write that must finish
        # even if the run is cancelled while it is in flight.
        write = asyncio.ensure_future(self._give_back())
        write.add_done_callback(_retrieve_exception)
        try:
            await asyncio.shield(write)
        except FencedOut:
            log.info("run.stopped", cause=cause.label, given_back=False, **self._log)
            instruments.TURNS.labels(outcome="lost").inc()
            return RunEnd.LOST
        log.info("run.stopped", cause=cause.label, given_back=True, **self._log)
        instruments.TURNS.labels(outcome="requeued").inc()
        return RunEnd.REQUEUED

    async def _give_back(self) -> Chat:
        async with asyncio.timeout(GIVE_BACK_TIMEOUT_S):
            return await runs.requeue(self._deps.pool, self.token)


def _retrieve_exception(task: asyncio.Future[Any]) -> None:
    """A shielded write may end after its run was cancelled; its outcome is logged there."""
    if not task.cancelled():
        task.exception()


def _step_outcome(step: asyncio.Task[None], output: StepOutput, cause: StopCause | None) -> str:
    """How a step ended, for the `chatd_steps_total` counter."""
    if step.cancelled():
        return "abandoned" if cause is not None else "interrupted"
    if step.exception() is not None:
        return "failed"
    return "tool_use" if output.tool_calls else "end_turn"
