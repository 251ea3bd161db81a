"""A fake Anthropic Messages API: `POST /v1/messages` answered with the real SSE event stream
(message_start, content_block_start/delta/stop, ping, message_delta with usage, message_stop),
in-stream `event: error`, and `{"type": "error", "error": {...}}` error bodies."""

from __future__ import annotations

import itertools
from typing import Any

from tests.fakes import (
    FakeProviderServer,
    HttpError,
    Step,
    StreamError,
    json_fragments,
    sse,
    word_chunks,
)

_ids = itertools.count(1)


class FakeAnthropicServer(FakeProviderServer):
    path = "/v1/messages"

    @property
    def base_url(self) -> str:
        """What to give the SDK: it appends /v1/messages itself."""
        return self.origin

    def response_headers(self) -> dict[str, str]:
        return {"request-id": f"req_fake_{next(_ids)}"}

    def error_body(self, error: HttpError) -> dict[str, Any]:
        return {"type": "error", "error": {"type": error.error_type, "message": error.message}}

    def stream_error_frame(self, error: StreamError) -> bytes:
        return sse(
            {"type": "error", "error": {"type": error.error_type, "message": error.message}},
            event="error",
        )

    def frames(self, step: Step, model: str) -> list[bytes]:
        frames = [
            sse(
                {
                    "type": "message_start",
                    "message": {
                        "id": f"msg_fake_{next(_ids)}",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": step.input_tokens,
                            "output_tokens": 1,
                            "cache_read_input_tokens": step.cache_read_tokens,
                            "cache_creation_input_tokens": step.cache_write_tokens,
                        },
                    },
                },
                event="message_start",
            )
        ]
        index = 0
        if step.reasoning:
            frames += _block(
                index,
                {"type": "thinking", "thinking": "", "signature": ""},
                [{"type": "thinking_delta", "thinking": c} for c in word_chunks(step.reasoning)]
                + [{"type": "signature_delta", "signature": f"sig-{len(step.reasoning)}"}],
            )
            index += 1
        frames.append(sse({"type": "ping"}, event="ping"))
        if step.text:
            frames += _block(
                index,
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": c} for c in word_chunks(step.text)],
            )
            index += 1
        for call in step.tool_calls:
            frames += _block(
                index,
                {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
                # The real API opens with an empty fragment before the JSON text.
                [
                    {"type": "input_json_delta", "partial_json": f}
                    for f in ["", *json_fragments(call.args)]
                ],
            )
            index += 1
        frames.append(
            sse(
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": "tool_use" if step.tool_calls else "end_turn",
                        "stop_sequence": None,
                    },
                    "usage": {"output_tokens": step.output_tokens},
                },
                event="message_delta",
            )
        )
        frames.append(sse({"type": "message_stop"}, event="message_stop"))
        return frames


def _block(index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> list[bytes]:
    return [
        sse(
            {"type": "content_block_start", "index": index, "content_block": start},
            event="content_block_start",
        ),
        *(
            sse(
                {"type": "content_block_delta", "index": index, "delta": d},
                event="content_block_delta",
            )
            for d in deltas
        ),
        sse({"type": "content_block_stop", "index": index}, event="content_block_stop"),
    ]


# --- reading a recorded request (what a responder decides from) ---------------------------


def system_text(body: dict[str, Any]) -> str:
    """The request's system prompt: a string or a list of text blocks on the wire."""
    system = body.get("system", "")
    if isinstance(system, str):
        return system
    return "".join(block.get("text", "") for block in system)


def blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def texts(message: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in blocks(message) if b["type"] == "text")


def first_user_text(body: dict[str, Any]) -> str:
    return texts(next(m for m in body["messages"] if m["role"] == "user"))


def tool_names(body: dict[str, Any]) -> list[str]:
    return [tool["name"] for tool in body.get("tools", [])]


def answered_tool_results(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The tool results of the request's last turn as (tool name, block), the name read from the
    tool_use block each one answers: what a model reads after its tool calls ran."""
    messages = body["messages"]
    results = [b for b in blocks(messages[-1]) if b["type"] == "tool_result"]
    names = {
        b["id"]: b["name"]
        for m in messages
        if m["role"] == "assistant"
        for b in blocks(m)
        if b["type"] == "tool_use"
    }
    return [(names.get(r["tool_use_id"], "?"), r) for r in results]
