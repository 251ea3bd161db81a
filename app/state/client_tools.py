"""Client-side tools (docs/requires_action.md): tool definitions a chat's client executes, the
calls of them that put a chat in `requires_action`, and the results that end that state.

A definition is `{name, description, input_schema}`; a chat carries a list of them
(`chats.client_tools`), given on create and replaced by a send that names `tools`. The model
is offered them next to the server-side tools; a call of one is not run by chatd: it is stored
as a pending call `{id, name, args}` until the client posts a result for it (or the deadline, a
Stop or an archive gives it an error result). Results become an ordinary `tool` message of
`tool_result` parts, the shape server-side tools produce.

Everything here is pure: shapes, bounds and the one built-in client tool, `ask_user_question`,
whose canonical definition the API serves (GET /api/v1/tools/ask_user_question) so that clients
declare it as it is."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from app.errors import Conflict, ValidationFailed

# What every provider accepts as a tool name (Anthropic's and OpenAI's rules agree on this).
CLIENT_TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
CLIENT_TOOL_NAME = re.compile(CLIENT_TOOL_NAME_PATTERN)
MAX_CLIENT_TOOLS = 64
MAX_TOOL_DESCRIPTION_CHARS = 4_000
# One definition's input_schema, and all the definitions of a chat, as JSON text.
MAX_INPUT_SCHEMA_CHARS = 20_000
MAX_CLIENT_TOOLS_CHARS = 200_000
# A client's result as JSON text: the bound a server-side tool's result has
# (app/tools/registry.py, MAX_RESULT_CHARS).
MAX_RESULT_CHARS = 50_000

# The error results of pending calls that get no answer from the client.
TIMED_OUT_RESULT = "timed out waiting for the client"
INTERRUPTED_RESULT = "interrupted"
ARCHIVED_RESULT = "the chat was archived"

ASK_USER_QUESTION = "ask_user_question"

# The built-in client tool. A client that can put a question to its user (the terminal client,
# the web page) declares this definition in `tools`; the answer it posts is `{"answer": text}`.
ASK_USER_QUESTION_TOOL: dict[str, Any] = {
    "name": ASK_USER_QUESTION,
    "description": (
        "Ask the user a question and wait for the answer. Use it when you need a decision or a"
        " piece of information that only the user has; do not use it for small talk. Offer"
        " `choices` when the answer is one of a few options (the user may still answer in their"
        ' own words). The result is {"answer": "<the user\'s answer>"}.'
    ),
    "input_schema": {
        "type": "object",
        "properties": {
            "question": {"type": "string", "description": "The question, short and complete."},
            "choices": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Optional answers to choose from.",
            },
        },
        "required": ["question"],
        "additionalProperties": False,
    },
}


def _invalid(message: str, field: str, detail: str) -> ValidationFailed:
    return ValidationFailed(message, validations=[{"field": field, "detail": detail}])


def normalize_client_tools(
    value: object, *, reserved: Collection[str] = ()
) -> list[dict[str, Any]]:
    """A list of client tool definitions, checked strictly; anything else is a 400. `reserved`
    are the names of the server-side tools: a client tool may not take one (the model would be
    offered two tools of one name)."""
    if not isinstance(value, list):
        raise _invalid("tools must be a list of tool definitions", "tools", "expected array")
    if len(value) > MAX_CLIENT_TOOLS:
        raise _invalid(
            f"at most {MAX_CLIENT_TOOLS} client tools", "tools", f"{len(value)} definitions"
        )
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        field = f"tools[{index}]"
        if not isinstance(item, dict):
            raise _invalid("a tool definition is an object", field, "expected object")
        unknown = set(item) - {"name", "description", "input_schema"}
        if unknown:
            raise _invalid(
                "unknown fields in a tool definition",
                field,
                "only name, description and input_schema are allowed",
            )
        name = item.get("name")
        if not isinstance(name, str) or not CLIENT_TOOL_NAME.fullmatch(name):
            raise _invalid(
                "a tool name is 1 to 64 letters, digits, _ or -",
                f"{field}.name",
                f"expected a string matching {CLIENT_TOOL_NAME_PATTERN}",
            )
        if name in seen:
            raise _invalid("two client tools share a name", f"{field}.name", f"{name} again")
        if name in reserved:
            raise _invalid(
                "a client tool may not take the name of a server-side tool",
                f"{field}.name",
                f"{name} is a server-side tool",
            )
        seen.add(name)
        description = item.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_TOOL_DESCRIPTION_CHARS:
            raise _invalid(
                "a tool description is a string",
                f"{field}.description",
                f"expected a string of at most {MAX_TOOL_DESCRIPTION_CHARS} characters",
            )
        schema = item.get("input_schema")
        _check_input_schema(schema, f"{field}.input_schema")
        assert isinstance(schema, dict)
        tools.append({"name": name, "description": description, "input_schema": schema})
    if len(json.dumps(tools)) > MAX_CLIENT_TOOLS_CHARS:
        raise _invalid(
            "the client tools are too large",
            "tools",
            f"more than {MAX_CLIENT_TOOLS_CHARS} characters of JSON",
        )
    return tools


def _check_input_schema(schema: object, field: str) -> None:
    """What every provider needs of a tool's input schema: a JSON Schema object of type
    `object`, with `properties` an object of schemas and `required` a list of names when given.
    The rest of the schema is the client's business (the model reads it)."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _invalid(
            "a tool's input_schema is a JSON Schema object of type object",
            field,
            'expected {"type": "object", ...}',
        )
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(
        isinstance(p, dict) for p in properties.values()
    ):
        raise _invalid(
            "input_schema.properties maps names to schemas",
            f"{field}.properties",
            "expected object",
        )
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _invalid(
            "input_schema.required is a list of names", f"{field}.required", "expected array"
        )
    if len(json.dumps(schema)) > MAX_INPUT_SCHEMA_CHARS:
        raise _invalid(
            "a tool's input_schema is too large",
            field,
            f"more than {MAX_INPUT_SCHEMA_CHARS} characters of JSON",
        )


def pending_call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """A call waiting for its client's result, as the chat row and the API show it."""
    return {"id": call_id, "name": name, "args": args}


def result_part(call: dict[str, Any], result: Any, *, is_error: bool) -> dict[str, Any]:
    """A pending call's result as a `tool_result` part (the shape of app/engine/step.py's)."""
    return {
        "type": "tool_result",
        "tool_call_id": call["id"],
        "name": call["name"],
        "result": result,
        "is_error": is_error,
    }


def error_results(pending: list[dict[str, Any]], message: str) -> list[dict[str, Any]]:
    """Error results for every pending call: the client did not answer (time-out, Stop,
    archive), and the history must never hold a tool call without a result."""
    return [result_part(call, message, is_error=True) for call in pending]


def check_results_shape(results: object) -> list[dict[str, Any]]:
    """The body's `results`: objects `{tool_call_id, result, is_error?}`, each call id once,
    each result at most MAX_RESULT_CHARS of JSON. Checked before the chat is looked at."""
    if not isinstance(results, list) or not results:
        raise _invalid("results must be a non-empty list", "results", "expected array")
    seen: set[str] = set()
    checked: list[dict[str, Any]] = []
    for index, item in enumerate(results):
        field = f"results[{index}]"
        if not isinstance(item, dict) or set(item) - {"tool_call_id", "result", "is_error"}:
            raise _invalid(
                "a result is {tool_call_id, result, is_error?}", field, "unexpected shape"
            )
        call_id = item.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise _invalid("tool_call_id is a string", f"{field}.tool_call_id", "expected string")
        if call_id in seen:
            raise _invalid(
                "a tool call is answered twice", f"{field}.tool_call_id", f"{call_id} again"
            )
        seen.add(call_id)
        if "result" not in item:
            raise _invalid("a result needs `result`", f"{field}.result", "missing")
        is_error = item.get("is_error", False)
        if not isinstance(is_error, bool):
            raise _invalid("is_error is a boolean", f"{field}.is_error", "expected boolean")
        if len(json.dumps(item["result"])) > MAX_RESULT_CHARS:
            raise _invalid(
                f"a result is at most {MAX_RESULT_CHARS} characters of JSON",
                f"{field}.result",
                "too long",
            )
        checked.append({"tool_call_id": call_id, "result": item["result"], "is_error": is_error})
    return checked


def answer_parts(
    pending: list[dict[str, Any]], results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The tool message of a client's answer: one result per pending call, in the order of the
    calls. The results must name exactly the pending calls: an id that is not pending (a late
    answer for an earlier turn, or a made-up one) is a conflict with the chat's state (409);
    a pending call without a result is a 400 that names it."""
    by_id = {result["tool_call_id"]: result for result in results}
    pending_ids = [call["id"] for call in pending]
    unknown = [call_id for call_id in by_id if call_id not in pending_ids]
    if unknown:
        raise Conflict(
            "the results name tool calls that are not pending",
            detail=f"not pending: {', '.join(unknown)[:500]} (pending: {', '.join(pending_ids)})",
        )
    missing = [call_id for call_id in pending_ids if call_id not in by_id]
    if missing:
        raise ValidationFailed(
            "every pending tool call needs a result",
            validations=[
                {"field": "results", "detail": f"no result for {call_id}"} for call_id in missing
            ],
        )
    return [
        result_part(call, by_id[call["id"]]["result"], is_error=by_id[call["id"]]["is_error"])
        for call in pending
    ]
