"""The Vercel AI SDK's UI message stream (protocol v1), translated from chatd's own stream
events, without I/O (docs/api.md, "Vercel AI SDK").

The AI SDK's `useChat` reads one assistant message per response: `start`, then per model step
`start-step` ... `finish-step` around text, reasoning and tool chunks, then `finish` (or `abort`
after a Stop, or `error`), then `data: [DONE]`. chatd streams a chat as messages and live parts
with cursors; the endpoints join the chat's hub from the cursor of the turn's user message and
feed every event here:

  - `message_part` of the assistant: text and reasoning deltas extend the open text/reasoning
    part (consecutive deltas of one kind are one part, as chatd persists them); a tool call is
    `tool-input-available` (a `dynamic` tool: the client has no schema for chatd's tools);
  - `message_part` of a tool: `tool-output-available` (`tool-output-error` when `is_error`);
  - `message` of the assistant (a step made durable): whatever its content has that the live
    parts did not (the last deltas of a step may only ever be seen here), then the open parts
    end; the step finishes once its tool results are out. `message` of a tool: the results not
    yet sent. A system message (a compaction record) is not part of the answer;
  - `retry` and `history_reset` with `step_discarded`: the attempt's live parts are void. The
    protocol cannot take back text a client has, so the open parts end, tool calls of the void
    attempt get a `tool-output-error`, the new attempt's output comes in new parts, and a
    transient `data-chatd-retry` chunk tells the app (the durable history, `GET …/messages`,
    has only the attempt that counted);
  - the end of the turn: `status: waiting` (`finish`, or `abort` when the turn was stopped),
    the next user message (a queued message became the next turn: `finish`), `error` (the
    chat failed or was deleted: `error`), `history_reset` with `edit` (the turn was replaced:
    `abort`).

`QueuedMessageWatch` finds the turn of a message that was queued: the user message it became.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Chunk = dict[str, Any]

# The response headers of a UI message stream (what the AI SDK's own servers send).
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell reverse proxies not to buffer the stream
    "x-vercel-ai-ui-message-stream": "v1",
}
DONE = b"data: [DONE]\n\n"

# Final notices of chatd's stream that are about the connection, not the chat: the endpoints
# handle them (rejoin from the cursor, or drop the connection so that the client resumes).
CONNECTION_NOTICES = frozenset({"resync", "shutdown", "unavailable"})
STOPPED = "the turn was stopped"


def encode(chunk: Chunk) -> bytes:
    """One chunk as an SSE event: `data: <json>` and a blank line."""
    return (
        b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    )


def answer_id(user_message_id: int) -> str:
    """The UI message id of the answer to user message `user_message_id`: the same in the POST
    answer and in every resumed stream, so a replay replaces the message a client has."""
    return f"answer-{user_message_id}"


def _error_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass
class _Block:
    """One text or reasoning part of the UI message, as sent so far."""

    kind: str  # "text" or "reasoning"
    id: str
    text: str = ""
    open: bool = True


@dataclass
class AnswerTranslator:
    """The UI message stream of the answer to one user message, fed chatd's stream events from
    that message's cursor (`<user message id>:0`). `done` once the turn ended."""

    user_message_id: int
    done: bool = False
    interrupted: bool = False  # a Stop was asked during this turn (the endpoint tells)
    _counter: int = 0
    _step_open: bool = False
    _blocks: list[_Block] = field(default_factory=list)  # the live parts of the current attempt
    _calls: dict[str, str] = field(default_factory=dict)  # tool call id -> tool name, announced
    _answered: set[str] = field(default_factory=set)  # tool call ids with an output sent
    _awaiting_results: bool = False  # the step's message had tool calls; its results follow
    _output: bool = False  # the turn produced a durable assistant message
    _live: bool = False  # live parts were sent since the last durable message

    def start(self) -> list[Chunk]:
        return [{"type": "start", "messageId": answer_id(self.user_message_id)}]

    def note_interrupt(self) -> None:
        self.interrupted = True

    def feed(self, event: str, data: Mapping[str, Any]) -> list[Chunk]:  # noqa: PLR0911  one branch per event type
        """The chunks for one chatd stream event (docs/api.md, "Frames")."""
        if self.done:
            return []
        if event == "message_part":
            return self._part(str(data.get("role")), data.get("part"))
        if event == "message":
            return self._message(data.get("message"))
        if event == "retry":
            notice = {k: v for k, v in data.items() if k not in ("type", "chat_id")}
            return [
                *self._void_attempt(),
                {"type": "data-chatd-retry", "data": notice, "transient": True},
            ]
        if event == "history_reset":
            if data.get("reason") == "step_discarded":
                return self._void_attempt()
            return self._end("abort", reason="the chat was edited; this answer was discarded")
        if event == "status":
            if data.get("status") == "waiting":
                stopped = self.interrupted or not self._output or self._live
                return self._end("abort" if stopped else "finish", reason=STOPPED)
            return []  # pending, running; `error` is followed by its error event
        if event == "error":
            text = str(data.get("message") or "the chat failed")
            if data.get("kind") == "deleted":
                text = "the chat was deleted"
            return self._end("error", reason=text)
        return []  # queue: not part of the answer

    # ----------------------------------------------------------------------------------------

    def _next_id(self, kind: str) -> str:
        self._counter += 1
        return f"{kind}-{self._counter}"

    def _ensure_step(self) -> list[Chunk]:
        if self._step_open:
            return []
        self._step_open = True
        return [{"type": "start-step"}]

    def _close_blocks(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        for block in self._blocks:
            if block.open:
                block.open = False
                chunks.append({"type": f"{block.kind}-end", "id": block.id})
        return chunks

    def _new_block(self, kind: str, text: str) -> tuple[_Block, list[Chunk]]:
        block = _Block(kind, self._next_id(kind))
        self._blocks.append(block)
        chunks: list[Chunk] = [{"type": f"{kind}-start", "id": block.id}]
        if text:
            block.text = text
            chunks.append({"type": f"{kind}-delta", "id": block.id, "delta": text})
        return block, chunks

    def _part(self, role: str, part: Any) -> list[Chunk]:
        if not isinstance(part, Mapping):
            return []
        kind = part.get("type")
        chunks: list[Chunk] = []
        if role == "assistant" and kind in ("text", "reasoning"):
            text = str(part.get("text") or "")
            if not text:
                return []
            chunks += self._ensure_step()
            self._live = True
            last = self._blocks[-1] if self._blocks else None
            if last is not None and last.open and last.kind == kind:
                last.text += text
                chunks.append({"type": f"{kind}-delta", "id": last.id, "delta": text})
            else:
                chunks += self._close_blocks()
                chunks += self._new_block(str(kind), text)[1]
            return chunks
        if role == "assistant" and kind == "tool_call":
            chunks += self._ensure_step()
            self._live = True
            chunks += self._close_blocks()
            return chunks + self._tool_call(part)
        if role == "tool" and kind == "tool_result":
            chunks += self._close_blocks()
            return chunks + self._tool_result(part)
        return []

    def _tool_call(self, part: Mapping[str, Any]) -> list[Chunk]:
        call_id = str(part.get("id") or "")
        if not call_id or call_id in self._calls:
            return []
        name = str(part.get("name") or "")
        self._calls[call_id] = name
        return [
            {
                "type": "tool-input-available",
                "toolCallId": call_id,
                "toolName": name,
                "input": part.get("args"),
                "dynamic": True,
            }
        ]

    def _tool_result(self, part: Mapping[str, Any]) -> list[Chunk]:
        call_id = str(part.get("tool_call_id") or "")
        # The client rejects an output for a call it was not told about; a result without its
        # call can only belong to an attempt this stream never showed.
        if call_id not in self._calls or call_id in self._answered:
            return []
        self._answered.add(call_id)
        result = part.get("result")
        if part.get("is_error"):
            return [
                {
                    "type": "tool-output-error",
                    "toolCallId": call_id,
                    "errorText": _error_text(result),
                    "dynamic": True,
                }
            ]
        return [
            {
                "type": "tool-output-available",
                "toolCallId": call_id,
                "output": result,
                "dynamic": True,
            }
        ]

    def _message(self, message: Any) -> list[Chunk]:
        if not isinstance(message, Mapping):
            return []
        role = message.get("role")
        content = message.get("content")
        parts = (
            [part for part in content if isinstance(part, Mapping)]
            if isinstance(content, list)
            else []
        )
        if role == "user":
            # A queued message became the next turn: this one is over.
            stopped = self.interrupted or not self._output
            return self._end("abort" if stopped else "finish", reason=STOPPED)
        if role == "assistant":
            return self._step_message(parts)
        if role == "tool":
            chunks: list[Chunk] = []
            for part in parts:
                if part.get("type") == "tool_result":
                    chunks += self._tool_result(part)
            self._awaiting_results = False
            return chunks + self._finish_step()
        return []  # system: a compaction record is not part of the answer

    def _step_message(self, parts: list[Mapping[str, Any]]) -> list[Chunk]:
        """A step became durable: send what its live parts did not, then end its parts."""
        chunks = self._finish_step() if self._awaiting_results else []
        chunks += self._ensure_step()
        live = list(self._blocks)
        index = 0
        has_calls = False
        for part in parts:
            kind = part.get("type")
            if kind in ("text", "reasoning"):
                text = str(part.get("text") or "")
                block = live[index] if index < len(live) else None
                if block is not None:
                    index += 1
                if block is not None and block.kind == kind and text.startswith(block.text):
                    rest = text[len(block.text) :]
                    if rest and block.open:
                        block.text = text
                        chunks.append({"type": f"{kind}-delta", "id": block.id, "delta": rest})
                    elif rest:
                        chunks += self._close_blocks()
                        chunks += self._new_block(str(kind), rest)[1]
                elif text:
                    # Not what was streamed (an attempt this stream saw only in part): the
                    # durable text as a part of its own.
                    chunks += self._close_blocks()
                    chunks += self._new_block(str(kind), text)[1]
            elif kind == "tool_call":
                has_calls = True
                chunks += self._close_blocks()
                chunks += self._tool_call(part)
        chunks += self._close_blocks()
        self._blocks = []
        self._output = True
        self._live = False
        waiting = has_calls and any(
            call_id not in self._answered
            for call_id in (str(p.get("id")) for p in parts if p.get("type") == "tool_call")
        )
        if waiting:
            self._awaiting_results = True
            return chunks
        return chunks + self._finish_step()

    def _finish_step(self) -> list[Chunk]:
        self._awaiting_results = False
        if not self._step_open:
            return []
        self._step_open = False
        return [{"type": "finish-step"}]

    def _unanswered_calls(self, text: str) -> list[Chunk]:
        chunks: list[Chunk] = []
        for call_id in self._calls:
            if call_id not in self._answered:
                self._answered.add(call_id)
                chunks.append(
                    {
                        "type": "tool-output-error",
                        "toolCallId": call_id,
                        "errorText": text,
                        "dynamic": True,
                    }
                )
        return chunks

    def _void_attempt(self) -> list[Chunk]:
        """The live parts of the attempt in progress are void (a retry, a discarded step)."""
        chunks = self._close_blocks()
        chunks += self._unanswered_calls("the step was started over")
        self._blocks = []
        self._live = False
        return chunks

    def _end(self, how: str, *, reason: str) -> list[Chunk]:
        chunks = self._close_blocks()
        chunks += self._unanswered_calls("the turn ended before this tool answered")
        self._blocks = []
        self.done = True
        if how == "error":
            return [*chunks, {"type": "error", "errorText": reason}]
        chunks += self._finish_step()
        if how == "abort":
            return [*chunks, {"type": "abort", "reason": reason}]
        return [*chunks, {"type": "finish", "finishReason": "stop"}]


@dataclass
class QueuedMessageWatch:
    """Which user message a queued message became, from chatd's stream events read from a
    cursor before it was queued.

    The queue's head becomes a user message in the same transaction that takes it from the
    queue, and a batch of events has the messages before the queue. So when a queue event no
    longer holds the entry and no edit came between (an edit empties the queue), the entry
    became the first user message since the queue last held it whose content is the entry's
    (entries ahead of it are answered first; two entries with the same content could be taken
    for each other, which changes nothing a user can see). A queue without the entry otherwise
    means it was deleted or dropped by an edit. A chat that went idle (a Stop of the turn
    ahead, or an error) with the entry still queued leaves it there: the watch ends, since
    nothing answers it until the chat moves again. The chat's state is only known at the end
    of a batch (`drained`), since a batch has its status before its queue."""

    queued_id: int
    content: list[dict[str, Any]]
    found: int | None = None  # the user message the entry became
    ended: Chunk | None = None  # why the watch ended without one: an `abort` or `error` chunk
    _candidates: list[tuple[int, Any]] = field(default_factory=list)
    _edited: bool = False
    _queued: bool = False  # the last queue seen held the entry
    _idle: str | None = None  # the last status seen, when it is waiting or error
    _error: str = "the chat failed"

    @property
    def done(self) -> bool:
        return self.found is not None or self.ended is not None

    def feed(self, event: str, data: Mapping[str, Any]) -> None:
        if self.done:
            return
        if event == "message":
            message = data.get("message")
            if isinstance(message, Mapping) and message.get("role") == "user":
                self._candidates.append((int(message.get("id") or 0), message.get("content")))
        elif event == "history_reset" and data.get("reason") == "edit":
            self._edited = True
            self._candidates = []
        elif event == "status":
            status = data.get("status")
            self._idle = str(status) if status in ("waiting", "error") else None
        elif event == "error":
            if data.get("kind") == "deleted":
                self.ended = {"type": "error", "errorText": "the chat was deleted"}
            else:
                self._error = str(data.get("message") or self._error)
        elif event == "queue":
            self._queue(data.get("queued"))

    def _queue(self, queued: Any) -> None:
        entries = queued if isinstance(queued, list) else []
        if any(isinstance(q, Mapping) and q.get("id") == self.queued_id for q in entries):
            self._queued = True
            self._candidates = []
            self._edited = False
            return
        if not self._edited:
            for message_id, content in self._candidates:
                if content == self.content:
                    self.found = message_id
                    return
        self.ended = {
            "type": "abort",
            "reason": "the queued message was removed (deleted, or the chat was edited)",
        }

    def drained(self) -> None:
        """Every event of the batch was fed: a chat left idle with the entry still queued."""
        if self.done or self._idle is None or not self._queued:
            return
        if self._idle == "error":
            self.ended = {"type": "error", "errorText": self._error}
        else:
            self.ended = {
                "type": "abort",
                "reason": "the turn ahead was stopped; the message is still queued",
            }
