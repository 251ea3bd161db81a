"""The prompt a run builds (app/runner.build_request): the compaction summary first, in the
system text every adapter accepts; the tools a child chat is offered; when a turn is the first."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from app.engine.compaction import HistoryMessage, messages_to_compact, summary_part
from app.engine.prompt import SUMMARY_PREAMBLE, build_request, first_question, history_view
from app.providers import anthropic, openai
from app.providers.base import ModelConfig
from app.state.model import Message
from app.tools.toolset import default_registry

CHAT_ID = uuid.uuid4()
CONFIG = ModelConfig(id=str(uuid.uuid4()), provider="anthropic", model="claude")


def _message(
    message_id: int,
    role: str,
    *parts: dict[str, Any],
    input_tokens: int = 0,
    cache_read_tokens: int = 0,
) -> Message:
    return Message(
        id=message_id,
        chat_id=CHAT_ID,
        role=role,
        content=list(parts),
        created_at=datetime(2030, 1, 1, tzinfo=UTC),
        input_tokens=input_tokens,
        cache_read_tokens=cache_read_tokens,
    )


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _summary(text: str) -> dict[str, Any]:
    return {
        "type": "compaction",
        "summary": text,
        "compressed_message_ids": [1, 4],
        "compressed_count": 4,
    }


# The prompt history after a compaction made during the turn of message 5: by id, the summary
# comes after the turn's user message, and the turn goes on after it.
AFTER_COMPACTION = [
    _message(5, "user", _text("third question")),
    _message(6, "system", _summary("they asked two questions")),
    _message(
        7, "assistant", {"type": "tool_call", "id": "call_1", "name": "add", "args": {"a": 1}}
    ),
    _message(
        8,
        "tool",
        {"type": "tool_result", "tool_call_id": "call_1", "name": "add", "result": 1},
    ),
]


def test_the_summary_opens_the_prompt_as_system_text() -> None:
    request = build_request(CONFIG, AFTER_COMPACTION, default_registry())
    assert request.system == f"{SUMMARY_PREAMBLE}\n\nthey asked two questions"
    assert [m.role for m in request.messages] == ["user", "assistant", "tool"]


def test_every_adapter_takes_the_summary() -> None:
    request = build_request(CONFIG, AFTER_COMPACTION, default_registry())
    system, messages, _tools = anthropic.build_prompt(request)
    assert system[0]["text"].endswith("they asked two questions")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    chat_messages = openai.build_messages(request)
    assert chat_messages[0] == {"role": "system", "content": request.system}
    assert [m["role"] for m in chat_messages] == ["system", "user", "assistant", "tool"]


def test_only_the_latest_summary_is_used_and_other_system_text_stays() -> None:
    history = [
        _message(1, "system", _text("Be brief.")),
        _message(2, "system", _summary("old")),
        _message(3, "user", _text("q")),
        _message(4, "system", _summary("new")),
    ]
    request = build_request(CONFIG, history, default_registry())
    assert request.system == f"Be brief.\n\n{SUMMARY_PREAMBLE}\n\nnew"


def test_a_child_is_not_offered_the_sub_agent_tools() -> None:
    history = [_message(1, "user", _text("q"))]
    parent = {t.name for t in build_request(CONFIG, history, default_registry()).tools}
    child = {
        t.name for t in build_request(CONFIG, history, default_registry(), for_child=True).tools
    }
    sub_agent_tools = {"spawn_agent", "wait_agent", "message_agent", "close_agent"}
    assert sub_agent_tools <= parent
    assert not sub_agent_tools & child
    assert {"add", "current_time"} <= child


def test_the_first_turn_is_the_one_answering_the_first_user_message() -> None:
    first = [_message(1, "user", _text("hello"))]
    assert first_question(first) == [_text("hello")]
    # Later steps of the first turn, and a system prompt before it, still count.
    assert first_question([_message(0, "system", _text("Be brief.")), *first]) is not None
    assert first_question([*first, *AFTER_COMPACTION[2:]]) is not None
    # A second turn, or anything compacted, does not.
    second = [*first, _message(2, "assistant", _text("hi")), _message(3, "user", _text("again"))]
    assert first_question(second) is None
    assert first_question(AFTER_COMPACTION) is None


def test_cached_prompt_tokens_count_as_context() -> None:
    (view,) = history_view(
        [_message(1, "assistant", _text("a"), input_tokens=10, cache_read_tokens=900)]
    )
    assert (view.input_tokens, view.output_tokens) == (910, 0)


def test_a_new_summary_folds_the_old_one_in_first_and_records_the_whole_range() -> None:
    history = [
        HistoryMessage(5, "user", [_text("third")]),
        HistoryMessage(6, "system", [_summary("old")]),
        HistoryMessage(7, "assistant", [_text("answer")]),
        HistoryMessage(9, "user", [_text("fourth")]),
    ]
    compacted = messages_to_compact(history)
    assert [m.id for m in compacted] == [6, 5, 7]
    part = summary_part("new", compacted)
    assert (part["compressed_message_ids"], part["compressed_count"]) == ([5, 7], 3)
