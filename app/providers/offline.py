"""The built-in offline provider `builtin`/`echo`: no API key, deterministic, realistic enough to
exercise everything around it (streaming, usage, tool calls, persistence, fan-out).

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
"""

from __future__ import annotations

import asyncio
import json
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


def _text_of(message: PromptMessage) -> str:
    return "".join(
        str(part.get("text", "")) for part in message.content if part.get("type") == "text"
    )


def _estimate_tokens(text: str) -> int:
    # The usual rule of thumb for English text: about four characters per token.
    return max(1, (len(text) + 3) // 4)


class EchoProvider:
    name = "builtin"

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        delay_s = float(request.config.options.get("token_delay_ms", 0)) / 1000.0
        stamped = request.config.options.get("emit_timestamps") is True
        prompt_text = json.dumps([m.content for m in request.messages])
        input_tokens = _estimate_tokens(prompt_text)

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
                yield tool_call
                yield StepFinished("tool_use", Usage(input_tokens, 10))
                return
            words = ["echo:", *user_text.split()]

        output_tokens = 0
        for index, word in enumerate(words):
            if delay_s and index:
                await asyncio.sleep(delay_s)
            chunk = word if index == 0 else " " + word
            output_tokens += _estimate_tokens(chunk)
            yield TextDelta(f"{chunk}@{time.time():.6f}" if stamped else chunk)
        yield StepFinished("end_turn", Usage(input_tokens, output_tokens))


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
