"""The sub-agent tools: `spawn_agent`, `wait_agent`, `message_agent`, `close_agent`, the model's
handle on app/state/subagents.py.

A child chat runs like any other chat, on any replica, with its parent's owner, client type and
model config. Sub-agents are one level deep: these tools are not offered to children
(`for_children=False`), and `subagents.spawn` refuses a child anyway. A chat reaches only its
own children; anything else is "no sub-agent" to the model.

Every expected failure (a bad argument, a chat that is not a child, a full queue, a spend
limit, too many open sub-agents) is a `ToolError`, which the model reads as a `tool_result`
with `is_error: true`; the run goes on. The writes are fenced by the parent's run token
(app/state/subagents.py): a run that lost its chat gets `FencedOut`, which is not a tool result but
stops the run.

`wait_agent` holds the parent's run (and its replica's run slot) while it waits on the
children's notifications; `timeout_s` is bounded by `MAX_WAIT_S` so that a parent cannot park a
slot for long, and a wait that times out says so (`timed_out: true`) with each child's status:
the model may wait again. See docs/engine.md, "Sub-agents"."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Iterator
from typing import Any

from app.errors import ChatdError, FencedOut
from app.state import subagents
from app.state.subagents import Parent, SubagentError
from app.tools.registry import Tool, ToolContext, ToolError, ToolRegistry

DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 300.0
# One wait_agent call waits on at most this many children at once.
MAX_AGENTS_PER_WAIT = 16
# The registry's bound of a wait_agent call: the longest wait plus room for the final reads.
WAIT_TOOL_TIMEOUT_S = MAX_WAIT_S + 30.0
MAX_TITLE_CHARS = 200

_CHAT_ID_SCHEMA = {"type": "string", "description": "The sub-agent's chat id (from spawn_agent)."}


def _parent(context: ToolContext) -> Parent:
    return Parent(
        chat_id=context.chat_id,
        owner=context.owner,
        is_child=context.is_child,
        run=context.run_token,
    )


@contextlib.contextmanager
def _as_tool_errors() -> Iterator[None]:
    """What the data layer refuses (not a child, archived, queue full, spend limit, bad
    content) is the model's to read and act on, not a failure of the run."""
    try:
        yield
    except FencedOut:
        raise  # the run lost its chat: it stops, the model is not told
    except SubagentError as exc:
        raise ToolError(str(exc)) from exc
    except ChatdError as exc:
        raise ToolError(exc.message) from exc


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ToolError(f"argument {key!r} must be a non-empty string")
    return value


def _chat_id(value: object, key: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise ToolError(f"argument {key!r} must be a chat id (a string)")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ToolError(f"argument {key!r} is not a chat id: {value!r}") from None


def _wait_ids(args: dict[str, Any]) -> list[uuid.UUID]:
    raw = args.get("chat_ids")
    if raw is None and "chat_id" in args:
        raw = [args["chat_id"]]
    if not isinstance(raw, list) or not raw:
        raise ToolError("argument 'chat_ids' must be a non-empty list of chat ids")
    if len(raw) > MAX_AGENTS_PER_WAIT:
        raise ToolError(f"wait for at most {MAX_AGENTS_PER_WAIT} sub-agents at once")
    ids = [_chat_id(value, "chat_ids") for value in raw]
    return list(dict.fromkeys(ids))  # each child once, in the order given


def _timeout_s(args: dict[str, Any]) -> float:
    value = args.get("timeout_s", DEFAULT_WAIT_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ToolError("argument 'timeout_s' must be a number of seconds")
    if value <= 0:
        raise ToolError("argument 'timeout_s' must be positive")
    return min(float(value), MAX_WAIT_S)


async def spawn_agent(args: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    prompt = _text(args, "prompt")
    title = args.get("title")
    if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE_CHARS):
        raise ToolError(f"argument 'title' must be a string of at most {MAX_TITLE_CHARS} chars")
    with _as_tool_errors():
        child = await subagents.spawn(
            context.pool,
            _parent(context),
            prompt,
            title=title or None,
            max_children=context.max_children,
        )
    return {"chat_id": str(child.id), "title": child.title, "status": child.status}


async def wait_agent(args: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    child_ids = _wait_ids(args)
    timeout_s = _timeout_s(args)
    parent = _parent(context)
    with _as_tool_errors():
        # Every id is checked before anything waits: a wrong id fails the call at once rather
        # than after the others' wait.
        for child_id in child_ids:
            await subagents.child(context.pool, parent, child_id)

    async def wait_one(child_id: uuid.UUID) -> dict[str, Any]:
        try:
            return await subagents.wait(
                context.pool, context.listener, parent, child_id, timeout_s=timeout_s
            )
        except SubagentError as exc:  # it vanished after the check (deleted): say so, go on
            return {"chat_id": str(child_id), "error": str(exc)}

    async with asyncio.TaskGroup() as waits:
        tasks = [
            waits.create_task(wait_one(child_id), name=f"wait-agent:{context.chat_id}:{child_id}")
            for child_id in child_ids
        ]
    return {"agents": [task.result() for task in tasks]}


async def message_agent(args: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    child_id = _chat_id(args.get("chat_id"), "chat_id")
    text = _text(args, "text")
    with _as_tool_errors():
        return await subagents.message(
            context.pool, _parent(context), child_id, text, queue_limit=context.queue_limit
        )


async def close_agent(args: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    child_id = _chat_id(args.get("chat_id"), "chat_id")
    with _as_tool_errors():
        return await subagents.close(context.pool, _parent(context), child_id)


def register_subagent_tools(registry: ToolRegistry) -> None:
    registry.register(
        Tool(
            name="spawn_agent",
            description=(
                "Start a sub-agent: a new chat that works on `prompt` on its own, with the same "
                "model, in parallel with you. Returns its chat_id at once; use wait_agent to get "
                "its answer."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "description": "The sub-agent's task."},
                    "title": {"type": "string", "description": "A short name for it."},
                },
                "required": ["prompt"],
                "additionalProperties": False,
            },
            handler=spawn_agent,
            for_children=False,
            source="subagents",
        )
    )
    registry.register(
        Tool(
            name="wait_agent",
            description=(
                "Wait until the given sub-agents have finished their turn (or timeout_s passed) "
                "and return each one's status and answer. A sub-agent still working after the "
                "timeout is reported with timed_out: true; you may wait again."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "chat_ids": {
                        "type": "array",
                        "items": _CHAT_ID_SCHEMA,
                        "minItems": 1,
                        "maxItems": MAX_AGENTS_PER_WAIT,
                    },
                    "timeout_s": {
                        "type": "number",
                        "description": (
                            f"Seconds to wait, default {DEFAULT_WAIT_S:g}, at most {MAX_WAIT_S:g}."
                        ),
                    },
                },
                "required": ["chat_ids"],
                "additionalProperties": False,
            },
            handler=wait_agent,
            timeout_s=WAIT_TOOL_TIMEOUT_S,
            for_children=False,
            source="subagents",
        )
    )
    registry.register(
        Tool(
            name="message_agent",
            description=(
                "Send a follow-up message to one of your sub-agents. If it is busy, the message "
                "is queued and answered after its current turn."
            ),
            input_schema={
                "type": "object",
                "properties": {"chat_id": _CHAT_ID_SCHEMA, "text": {"type": "string"}},
                "required": ["chat_id", "text"],
                "additionalProperties": False,
            },
            handler=message_agent,
            for_children=False,
            source="subagents",
        )
    )
    registry.register(
        Tool(
            name="close_agent",
            description="Stop and archive one of your sub-agents when you no longer need it.",
            input_schema={
                "type": "object",
                "properties": {"chat_id": _CHAT_ID_SCHEMA},
                "required": ["chat_id"],
                "additionalProperties": False,
            },
            handler=close_agent,
            for_children=False,
            source="subagents",
        )
    )
