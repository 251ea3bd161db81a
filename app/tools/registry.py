"""The tool registry: what the model is offered (`specs()`) and how a call is executed
(`call()`).

A tool is a name, a description, a JSON schema for its arguments and an async handler. Handlers
get the parsed arguments and a `ToolContext` (which chat, which run), and return any
JSON-serializable value. Raising `ToolError` is a deliberate, user-facing failure (a bad
argument, a refusal): its message becomes the tool result, with `is_error: true`. Anything else
a tool raises is a bug or an outage: the model reads only "the tool failed: internal error" and
the exception goes to the log with the chat id, so no exception text (SQL, paths, hosts,
secrets) ever reaches the model or the chat's history. A broken tool never breaks a run; a run
that lost its chat (`FencedOut`) is the one exception that propagates, so the run stops.
Cancellation of the run (interrupt, shutdown) propagates too; a CancelledError raised inside
the tool while nobody cancelled the run is a failure of the tool like any other. A call is
bounded by its tool's timeout.
A tool may be kept from sub-agents (`for_children=False`): it is not offered to a child chat,
and a child that calls it anyway gets an error result.

Plug-in point: a distribution may declare an entry point in the group `chatd.tools` whose object
is a callable taking the registry (`def register(registry: ToolRegistry) -> None`);
`app.tools.toolset.default_registry()` loads the built-ins and then every such plug-in. This
module defines the types and the registry only and imports no tool module, so tool modules can
import it without a circle."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.db.listener import Listener
from app.errors import FencedOut
from app.log import get_logger
from app.providers.base import ToolSpec
from app.state.model import Owner
from app.state.runs import RunToken

log = get_logger(__name__)

ENTRY_POINT_GROUP = "chatd.tools"
DEFAULT_TOOL_TIMEOUT_S = 60.0
# The bound of a chat's queue of user messages (Settings.queue_limit), as sub-agent tools see it.
DEFAULT_QUEUE_LIMIT = 20
# The open sub-agents a chat may have at once (Settings.max_children_per_chat).
DEFAULT_MAX_CHILDREN = 8
MAX_RESULT_CHARS = 50_000
# What the model reads when a tool failed in a way it did not mean to report.
INTERNAL_ERROR = "internal error"


class ToolError(Exception):
    """A tool's own, expected failure: its message is shown to the model as the result."""


class ToolNameClash(ValueError):
    """A tool was registered under a name another tool already has: the later one is refused
    (the model calls tools by name, so a name must mean one tool)."""


@dataclass(frozen=True)
class ToolContext:
    """Who calls: the chat and its run (`worker_id`, `generation`: the run's fencing token, which
    every write a tool makes for the run must check), on behalf of which user, and the replica's
    database pool and listener for tools that need them (sub-agent tools create child chats and
    wait on their notifications)."""

    chat_id: uuid.UUID
    worker_id: uuid.UUID
    generation: int
    owner: Owner
    parent_chat_id: uuid.UUID | None
    pool: asyncpg.Pool
    listener: Listener
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    max_children: int = DEFAULT_MAX_CHILDREN

    @property
    def is_child(self) -> bool:
        return self.parent_chat_id is not None

    @property
    def run_token(self) -> RunToken:
        return RunToken(self.chat_id, self.worker_id, self.generation)


ToolHandler = Callable[[dict[str, Any], ToolContext], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    handler: ToolHandler
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
    # Offered to sub-agents (child chats) too. The sub-agent tools are not: children have no
    # children of their own.
    for_children: bool = True
    # Where the tool comes from ("builtin", "subagents", "plugin <name>", "mcp <server>"): what
    # a name clash names.
    source: str = "builtin"

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.input_schema)


@dataclass(frozen=True)
class ToolOutcome:
    result: Any
    is_error: bool


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add `tool`; a name that is taken raises ToolNameClash and changes nothing."""
        existing = self._tools.get(tool.name)
        if existing is not None:
            raise ToolNameClash(
                f"tool {tool.name!r} of {tool.source} is refused: {existing.source} already"
                " registered a tool of that name"
            )
        self._tools[tool.name] = tool

    def tools(self) -> list[Tool]:
        """Every tool, by name."""
        return [self._tools[name] for name in self.names()]

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def specs(self, *, for_child: bool = False) -> list[ToolSpec]:
        """What the model of a chat is offered; a child chat (`for_child`) gets fewer tools."""
        tools = (self._tools[name] for name in self.names())
        return [tool.spec for tool in tools if tool.for_children or not for_child]

    async def call(self, name: str, args: dict[str, Any], context: ToolContext) -> ToolOutcome:
        """Run one tool call. Cancellation (an interrupt, a shutdown) propagates; every other
        failure is the call's result."""
        tool = self._tools.get(name)
        if tool is None:
            return ToolOutcome(f"unknown tool {name!r}", is_error=True)
        if context.is_child and not tool.for_children:
            return ToolOutcome(f"tool {name!r} is not available to sub-agents", is_error=True)
        try:
            async with asyncio.timeout(tool.timeout_s):
                result = await tool.handler(args, context)
        except ToolError as exc:
            return ToolOutcome(str(exc), is_error=True)
        except TimeoutError:
            return ToolOutcome(f"tool {name!r} timed out after {tool.timeout_s:g}s", is_error=True)
        except FencedOut:
            raise  # the run lost its chat: it must stop, not tell the model
        except (asyncio.CancelledError, Exception) as exc:
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                raise  # an interrupt or a shutdown: the run decides what it means
            # A CancelledError here was raised inside the tool (a cancelled scope of a library
            # it uses) while nobody cancelled the run: the tool failed. Propagating it would end
            # the step "cancelled without a cause", which fails the whole chat.
            # The text of an unexpected exception is for the operator, never for the model.
            log.error(
                "tool.failed", chat_id=context.chat_id, tool=name, error=repr(exc), exc_info=True
            )
            return ToolOutcome(f"tool {name!r} failed: {INTERNAL_ERROR}", is_error=True)
        return _checked_result(name, result)


def _checked_result(name: str, result: Any) -> ToolOutcome:
    """The outcome of a tool that returned: its result if the model can be given it (JSON, and
    not longer than MAX_RESULT_CHARS), else an error the model can read."""
    try:
        encoded = json.dumps(result)
    except (TypeError, ValueError):
        return ToolOutcome(f"tool {name!r} returned a value that is not JSON", is_error=True)
    if len(encoded) > MAX_RESULT_CHARS:
        return ToolOutcome(
            f"tool {name!r} returned {len(encoded)} characters, more than {MAX_RESULT_CHARS}",
            is_error=True,
        )
    return ToolOutcome(result, is_error=False)


def _being_cancelled() -> bool:
    """Whether someone asked to cancel the task we run in (the cause of a CancelledError)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
