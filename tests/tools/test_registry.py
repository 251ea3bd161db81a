"""The tool registry's contract with the model: deliberate tool errors are shown as they are,
anything else a tool raises is a generic error result (its details go to the log, with the chat
id), and a run that lost its chat is not turned into a tool result."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, cast

import asyncpg
import pytest

from app.db.listener import Listener
from app.errors import FencedOut
from app.state.model import Owner
from app.tools.registry import Tool, ToolContext, ToolError, ToolRegistry

SECRET = "postgresql://chatd:hunter2@db.internal:5432/chatd"


def context() -> ToolContext:
    # These tools touch neither the database nor the listener.
    return ToolContext(
        chat_id=uuid.uuid4(),
        worker_id=uuid.uuid4(),
        generation=1,
        owner=Owner(user_id=uuid.uuid4(), organization_id=uuid.uuid4()),
        parent_chat_id=None,
        pool=cast(asyncpg.Pool, None),
        listener=cast(Listener, None),
    )


def registry_with(handler: Any) -> ToolRegistry:
    return ToolRegistry([Tool("probe", "a test tool", {"type": "object"}, handler)])


async def test_an_unexpected_exception_gives_the_model_a_generic_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(_args: dict[str, Any], _context: ToolContext) -> None:
        raise OSError(f"could not connect to {SECRET}")

    calling = context()
    with caplog.at_level(logging.ERROR):
        outcome = await registry_with(broken).call("probe", {}, calling)

    assert outcome.is_error
    assert outcome.result == "tool 'probe' failed: internal error"
    # The operator gets the details, findable by chat id.
    failures = [r for r in caplog.records if "tool.failed" in r.getMessage()]
    assert len(failures) == 1
    assert str(calling.chat_id) in failures[0].getMessage()
    assert SECRET in failures[0].getMessage()
    assert failures[0].exc_info is not None


async def test_a_deliberate_tool_error_stays_informative() -> None:
    async def picky(args: dict[str, Any], _context: ToolContext) -> None:
        raise ToolError(f"argument 'path' must be a string, not {args.get('path')!r}")

    outcome = await registry_with(picky).call("probe", {"path": 3}, context())
    assert outcome.is_error
    assert outcome.result == "argument 'path' must be a string, not 3"


async def test_a_run_that_lost_its_chat_is_not_a_tool_result() -> None:
    async def fenced(_args: dict[str, Any], _context: ToolContext) -> None:
        raise FencedOut("the run no longer owns its chat")

    with pytest.raises(FencedOut):
        await registry_with(fenced).call("probe", {}, context())


async def test_a_cancellation_inside_a_tool_while_nobody_cancelled_the_run_is_a_failure() -> None:
    async def reset(_args: dict[str, Any], _context: ToolContext) -> None:
        raise asyncio.CancelledError("a library's cancel scope")

    outcome = await registry_with(reset).call("probe", {}, context())
    assert outcome.is_error
    assert outcome.result == "tool 'probe' failed: internal error"


async def test_cancelling_the_run_during_a_tool_still_cancels() -> None:
    started = asyncio.Event()

    async def forever(_args: dict[str, Any], _context: ToolContext) -> None:
        started.set()
        await asyncio.Event().wait()

    call = asyncio.create_task(registry_with(forever).call("probe", {}, context()))
    await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
