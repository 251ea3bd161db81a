"""A few safe built-in tools: no network, no filesystem, no unbounded work."""

from __future__ import annotations

import datetime
import math
from typing import Any

from app.tools.registry import Tool, ToolContext, ToolError, ToolRegistry


async def current_time(args: dict[str, Any], _context: ToolContext) -> dict[str, str]:
    """The current UTC time, ISO 8601."""
    del args
    return {"utc": datetime.datetime.now(datetime.UTC).isoformat()}


def _number(args: dict[str, Any], key: str) -> float:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ToolError(f"argument {key!r} must be a finite number")
    return float(value)


async def add(args: dict[str, Any], _context: ToolContext) -> int | float:
    """a + b."""
    total = _number(args, "a") + _number(args, "b")
    return int(total) if total.is_integer() and abs(total) < 2**53 else total


def register_builtin_tools(registry: ToolRegistry) -> None:
    registry.register(
        Tool(
            name="current_time",
            description="The current date and time in UTC (ISO 8601).",
            input_schema={"type": "object", "properties": {}, "additionalProperties": False},
            handler=current_time,
        )
    )
    registry.register(
        Tool(
            name="add",
            description="Add two numbers.",
            input_schema={
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
            handler=add,
        )
    )
