"""The translation of chatd's stream events into the AI SDK's UI message stream
(app/stream/ui_message.py), without I/O: every event type, the reconciliation of live parts
with the durable message, retries, the end of a turn, and finding the turn of a queued
message."""

from __future__ import annotations

from typing import Any

from app.stream.ui_message import AnswerTranslator, QueuedMessageWatch, answer_id, encode

CHAT = "8c7b5d1e-0000-4000-8000-000000000001"


def part(text: str, kind: str = "text", role: str = "assistant") -> tuple[str, dict[str, Any]]:
    return "message_part", {"chat_id": CHAT, "role": role, "part": {"type": kind, "text": text}}


def message(message_id: int, role: str, *content: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "message", {
        "chat_id": CHAT,
        "message": {"id": message_id, "role": role, "content": list(content)},
    }


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def status(value: str) -> tuple[str, dict[str, Any]]:
    return "status", {"chat_id": CHAT, "status": value, "version": 1}


def queue(*ids: int) -> tuple[str, dict[str, Any]]:
    return "queue", {"chat_id": CHAT, "queued": [{"id": i, "content": []} for i in ids]}


def run(translator: AnswerTranslator, *events: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    chunks = translator.start()
    for event, data in events:
        chunks += translator.feed(event, data)
    return chunks


def test_a_text_answer_streamed_live_then_made_durable() -> None:
    chunks = run(
        AnswerTranslator(7),
        status("running"),
        part("echo:"),
        part(" hi"),
        message(8, "assistant", text("echo: hi there")),
        status("waiting"),
    )
    assert chunks == [
        {"type": "start", "messageId": "answer-7"},
        {"type": "start-step"},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "echo:"},
        {"type": "text-delta", "id": "text-1", "delta": " hi"},
        {"type": "text-delta", "id": "text-1", "delta": " there"},
        {"type": "text-end", "id": "text-1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


def test_a_replay_names_everything_the_same() -> None:
    events = [
        part("a"),
        part("b", "reasoning"),
        message(9, "assistant", text("a")),
        status("waiting"),
    ]
    assert run(AnswerTranslator(7), *events) == run(AnswerTranslator(7), *events)
    assert answer_id(7) == "answer-7"


def test_a_step_seen_only_as_its_message_still_has_its_parts() -> None:
    chunks = run(
        AnswerTranslator(1),
        message(
            2,
            "assistant",
            {"type": "reasoning", "text": "think"},
            text("said"),
            {"type": "tool_call", "id": "c1", "name": "clock", "args": {}},
        ),
        message(
            3,
            "tool",
            {
                "type": "tool_result",
                "tool_call_id": "c1",
                "name": "clock",
                "result": "boom",
                "is_error": True,
            },
        ),
        message(4, "system", {"type": "compaction", "summary": "…"}),
        message(5, "assistant", text("done")),
        status("waiting"),
    )
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-available",
        "tool-output-error",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    error = next(c for c in chunks if c["type"] == "tool-output-error")
    assert error == {
        "type": "tool-output-error",
        "toolCallId": "c1",
        "errorText": "boom",
        "dynamic": True,
    }


def test_a_tool_result_is_sent_once_live_or_from_the_message() -> None:
    call = {"type": "tool_call", "id": "c1", "name": "add", "args": {"a": 1}}
    result = {
        "type": "tool_result",
        "tool_call_id": "c1",
        "name": "add",
        "result": 2,
        "is_error": False,
    }
    chunks = run(
        AnswerTranslator(1),
        ("message_part", {"chat_id": CHAT, "role": "assistant", "part": call}),
        ("message_part", {"chat_id": CHAT, "role": "tool", "part": result}),
        message(2, "assistant", call),
        message(3, "tool", result),
        # A result without a call this stream showed would be refused by the client.
        (
            "message_part",
            {"chat_id": CHAT, "role": "tool", "part": result | {"tool_call_id": "zz"}},
        ),
    )
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "tool-input-available",
        "tool-output-available",
        "finish-step",
    ]


def test_a_retry_closes_the_void_attempt_and_tells_the_app() -> None:
    translator = AnswerTranslator(1)
    chunks = run(
        translator,
        part("half an"),
        (
            "message_part",
            {
                "chat_id": CHAT,
                "role": "assistant",
                "part": {"type": "tool_call", "id": "x", "name": "t", "args": {}},
            },
        ),
        (
            "retry",
            {"type": "retry", "chat_id": CHAT, "attempt": 1, "delay_ms": 500, "kind": "overloaded"},
        ),
        part("whole"),
        message(2, "assistant", text("whole answer")),
        status("waiting"),
    )
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-available",
        "tool-output-error",
        "data-chatd-retry",
        "text-start",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    retry = chunks[7]
    assert retry == {
        "type": "data-chatd-retry",
        "data": {"attempt": 1, "delay_ms": 500, "kind": "overloaded"},
        "transient": True,
    }
    # The new attempt is a part of its own, reconciled with the message on its own.
    assert chunks[8]["id"] != chunks[2]["id"]
    assert [c["delta"] for c in chunks if c["type"] == "text-delta"] == [
        "half an",
        "whole",
        " answer",
    ]


def test_a_discarded_step_is_like_a_retry_without_the_notice() -> None:
    chunks = run(
        AnswerTranslator(1),
        part("lost"),
        ("history_reset", {"chat_id": CHAT, "from_message_id": 2, "reason": "step_discarded"}),
        part("again"),
    )
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "text-start",
        "text-delta",
    ]


def test_durable_text_that_differs_from_what_was_streamed_gets_a_part_of_its_own() -> None:
    chunks = run(AnswerTranslator(1), part("abc"), message(2, "assistant", text("xyz")))
    deltas = [(c["id"], c["delta"]) for c in chunks if c["type"] == "text-delta"]
    assert deltas == [("text-1", "abc"), ("text-2", "xyz")]
    assert [c["type"] for c in chunks][-2:] == ["text-end", "finish-step"]


def test_how_a_turn_ends() -> None:
    answered = [part("a"), message(2, "assistant", text("a"))]
    assert run(AnswerTranslator(1), *answered, status("waiting"))[-1]["type"] == "finish"
    # The next user message (a queued one) starts the next turn: this one is over.
    ended = run(AnswerTranslator(1), *answered, message(3, "user", text("next")), part("b"))
    assert ended[-1] == {"type": "finish", "finishReason": "stop"}

    stopped = AnswerTranslator(1)
    stopped.note_interrupt()
    chunks = run(stopped, *answered, status("waiting"))
    assert chunks[-1] == {"type": "abort", "reason": "the turn was stopped"}
    assert stopped.done and stopped.feed(*part("late")) == []
    # Stopped before any output (a pending chat), or cut without a message (archived).
    assert run(AnswerTranslator(1), status("waiting"))[-1]["type"] == "abort"
    edited = run(
        AnswerTranslator(1),
        part("a"),
        ("history_reset", {"chat_id": CHAT, "from_message_id": 1, "reason": "edit"}),
    )
    assert edited[-1]["type"] == "abort"

    failed = run(
        AnswerTranslator(1),
        part("a"),
        status("error"),
        ("error", {"chat_id": CHAT, "message": "rate limited", "kind": "rate_limit"}),
    )
    assert failed[-2:] == [
        {"type": "text-end", "id": "text-1"},
        {"type": "error", "errorText": "rate limited"},
    ]
    deleted = run(
        AnswerTranslator(1), ("error", {"chat_id": CHAT, "message": "x", "kind": "deleted"})
    )
    assert deleted[-1] == {"type": "error", "errorText": "the chat was deleted"}


def test_a_cut_answer_ends_with_abort() -> None:
    chunks = run(AnswerTranslator(1), part("a"), status("waiting"))
    assert chunks[-3:] == [
        {"type": "text-end", "id": "text-1"},
        {"type": "finish-step"},
        {"type": "abort", "reason": "the turn was stopped"},
    ]


def test_encode_is_one_sse_data_event() -> None:
    assert encode({"type": "text-delta", "id": "t", "delta": "é\n"}) == (
        'data: {"type":"text-delta","id":"t","delta":"é\\n"}\n\n'.encode()
    )


# --------------------------------------------------------------------------------------------
# The turn of a queued message.

QUEUED = [text("second")]


def watch(*events: tuple[str, dict[str, Any]], drained: bool = True) -> QueuedMessageWatch:
    queued = QueuedMessageWatch(42, QUEUED)
    for event, data in events:
        queued.feed(event, data)
    if drained:
        queued.drained()
    return queued


def test_the_entry_becomes_the_user_message_that_comes_when_it_leaves_the_queue() -> None:
    found = watch(
        queue(41, 42),
        message(10, "user", text("first")),  # the entry ahead of it
        queue(42),
        message(11, "assistant", text("echo: first")),
        message(12, "user", *QUEUED),
        status("running"),
        queue(),
    )
    assert found.found == 12 and found.done
    # Everything in one batch (a late join): its status comes before its queue.
    late = watch(
        message(12, "user", *QUEUED),
        message(13, "assistant", text("echo: second")),
        status("waiting"),
        queue(),
    )
    assert late.found == 12


def test_the_first_user_message_with_its_content_is_taken() -> None:
    found = watch(
        queue(42, 43), message(12, "user", *QUEUED), message(14, "user", *QUEUED), queue()
    )
    assert found.found == 12


def test_an_entry_deleted_or_dropped_by_an_edit_ends_the_watch() -> None:
    deleted = watch(queue(42), queue())
    assert deleted.found is None and deleted.ended is not None
    assert deleted.ended["type"] == "abort"
    edited = watch(
        queue(42),
        ("history_reset", {"chat_id": CHAT, "from_message_id": 5, "reason": "edit"}),
        message(12, "user", *QUEUED),  # the edited message, whatever its text
        queue(),
    )
    assert edited.found is None and edited.ended is not None


def test_a_chat_left_idle_with_the_entry_queued_ends_the_watch() -> None:
    assert watch(queue(42), status("running")).done is False
    stopped = watch(queue(42), status("waiting"))
    assert stopped.ended is not None and stopped.ended["type"] == "abort"
    failed = watch(
        queue(42), status("error"), ("error", {"chat_id": CHAT, "message": "boom", "kind": "x"})
    )
    assert failed.ended == {"type": "error", "errorText": "boom"}
    # A chat that went idle in the batch that took the entry: the queue after the status says.
    answered = watch(
        queue(42),
        message(12, "user", *QUEUED),
        message(13, "assistant"),
        status("waiting"),
        queue(),
    )
    assert answered.found == 12
