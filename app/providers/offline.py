"""The built-in offline models `builtin`/`echo` and `builtin`/`script`: no API key, deterministic,
realistic enough to exercise everything around them (streaming, usage, tool calls, persistence,
fan-out).

`echo`:

- It streams back the last user message's text word by word, prefixed "echo: ", waiting
  `options.token_delay_ms` (default 0) between words.
- A user message of the form `/tool NAME {json args}` makes it call tool NAME with those args;
  once the tool's result is in the prompt, it answers "echo: NAME returned <result>". This is
  how tests and demos drive the tool loop without a real model.
- Benchmark instrumentation: with `options.emit_timestamps: true` every word is followed by
  `@<wall-clock seconds>` (`time.time()` with 6 decimals) taken when the word is emitted, e.g.
  `echo:@1732180000.123456 hello@1732180000.173512`, so a client that receives the live parts
  can compute each word's latency from emit to receipt (`make bench` fanout scenario). Off by
  default; never set it for a model users talk to.

`script` (ScriptProvider) calls any tool on command, so demos, tests and benchmarks of tools
need no key:

- A user message `/call NAME {json args}` makes it call tool NAME with those arguments, whether
  or not the tool is offered (a tool that is not gets its "unknown tool" error result, which is
  worth seeing too). Arguments that are not a JSON object are answered in words, with no call.
- After the tool's result it answers `result: <the result>`: a string as it is, anything else
  as JSON; an error result as `result: error: <message>`. One line per result.
- Any other message is echoed exactly like `echo` does.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app.providers.base import (
    ModelRequest,
    PromptMessage,
    StepFinished,
    StreamEvent,
    TextDelta,
    ToolCall,
    Usage,
)

TOOL_COMMAND = "/tool "
CALL_COMMAND = "/call"
CALL_USAGE = "script: usage: /call <tool name> <JSON object of arguments>"


def _text_of(message: PromptMessage) -> str:
    return "".join(
        str(part.get("text", "")) for part in message.content if part.get("type") == "text"
    )


def _estimate_tokens(text: str) -> int:
    # The usual rule of thumb for English text: about four characters per token.
    return max(1, (len(text) + 3) // 4)


class EchoProvider:
    name = "builtin"

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        # Not a generator itself: it hands out the generator of its answer, so each word passes
        # one generator, not two (this is the benchmarks' model: its cost is in their numbers).
        stamped = request.config.options.get("emit_timestamps") is True

        last = request.messages[-1] if request.messages else None
        if last is not None and last.role == "tool":
            results = [p for p in last.content if p.get("type") == "tool_result"]
            words = ["echo:"] + [
                f"{r.get('name')} returned {json.dumps(r.get('result'))}" for r in results
            ]
        else:
            user_text = next(
                (_text_of(m) for m in reversed(request.messages) if m.role == "user"), ""
            )
            tool_call = _parse_tool_command(user_text)
            if tool_call is not None and any(t.name == tool_call.name for t in request.tools):
                return _events(
                    tool_call, StepFinished("tool_use", Usage(_input_tokens(request), 10))
                )
            words = ["echo:", *user_text.split()]

        chunks = [word if index == 0 else " " + word for index, word in enumerate(words)]
        return _stream_chunks(request, chunks, stamped=stamped)


async def _events(*events: StreamEvent) -> AsyncIterator[StreamEvent]:
    for event in events:
        yield event


class ScriptProvider:
    """`builtin`/`script`: calls a tool on `/call`, reports its result, echoes the rest."""

    name = "builtin"

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        last = request.messages[-1] if request.messages else None
        if last is not None and last.role == "tool":
            lines = [
                _result_line(part) for part in last.content if part.get("type") == "tool_result"
            ]
            async for event in _stream_chunks(request, _chunks("\n".join(lines))):
                yield event
            return
        user_text = next((_text_of(m) for m in reversed(request.messages) if m.role == "user"), "")
        if not _is_call(user_text):
            async for event in EchoProvider().stream(request):
                yield event
            return
        call = _parse_call(user_text)
        if isinstance(call, str):  # not a call: why, in words
            async for event in _stream_chunks(request, _chunks(call)):
                yield event
            return
        yield call
        yield StepFinished("tool_use", Usage(_input_tokens(request), 10))


def _input_tokens(request: ModelRequest) -> int:
    return _estimate_tokens(json.dumps([m.content for m in request.messages]))


async def _stream_chunks(
    request: ModelRequest, chunks: list[str], *, stamped: bool = False
) -> AsyncIterator[StreamEvent]:
    """Stream `chunks` as text deltas, `options.token_delay_ms` apart, then end the turn."""
    delay_s = float(request.config.options.get("token_delay_ms", 0)) / 1000.0
    output_tokens = 0
    for index, chunk in enumerate(chunks):
        if delay_s and index:
            await asyncio.sleep(delay_s)
        output_tokens += _estimate_tokens(chunk)
        yield TextDelta(f"{chunk}@{time.time():.6f}" if stamped else chunk)
    yield StepFinished("end_turn", Usage(_input_tokens(request), output_tokens))


def _chunks(text: str) -> list[str]:
    """`text` cut into word-sized pieces that join back to exactly `text`."""
    pieces: list[str] = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)) :]
    return [*pieces, tail] if tail or not pieces else pieces


def _is_call(text: str) -> bool:
    return text == CALL_COMMAND or text.startswith(CALL_COMMAND + " ")


def _parse_call(text: str) -> ToolCall | str:
    """The tool call of a `/call NAME {json}` message, or why it is not one."""
    name, _, raw_args = text[len(CALL_COMMAND) :].strip().partition(" ")
    if not name:
        return CALL_USAGE
    try:
        args: Any = json.loads(raw_args) if raw_args.strip() else {}
    except json.JSONDecodeError as exc:
        return f"script: the arguments are not JSON ({exc.msg}). {CALL_USAGE}"
    if not isinstance(args, dict):
        return f"script: the arguments must be a JSON object. {CALL_USAGE}"
    return ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=name, args=args)


def _result_line(part: dict[str, Any]) -> str:
    result = part.get("result")
    text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return f"result: error: {text}" if part.get("is_error") else f"result: {text}"


def _parse_tool_command(text: str) -> ToolCall | None:
    if not text.startswith(TOOL_COMMAND):
        return None
    name, _, raw_args = text[len(TOOL_COMMAND) :].strip().partition(" ")
    try:
        args: Any = json.loads(raw_args) if raw_args.strip() else {}
    except json.JSONDecodeError:
        args = {"input": raw_args}
    if not isinstance(args, dict):
        args = {"input": args}
    return ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=name, args=args)
