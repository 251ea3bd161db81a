from __future__ import annotations

from app.engine.compaction import (
    HistoryMessage,
    estimate_tokens,
    messages_to_compact,
    needs_compaction,
    summary_part,
    summary_request,
)
from app.providers.base import ModelConfig


def _text(role: str, text: str, message_id: int, **usage: int) -> HistoryMessage:
    return HistoryMessage(message_id, role, [{"type": "text", "text": text}], **usage)


def test_the_last_step_usage_is_trusted_and_only_later_messages_are_estimated() -> None:
    messages = [
        _text("user", "x" * 400, 1),
        _text("assistant", "answer", 2, input_tokens=500, output_tokens=20),
        _text("user", "y" * 400, 3),
    ]
    later = len('[{"type": "text", "text": "' + "y" * 400 + '"}]') // 4
    assert estimate_tokens(messages) == 520 + later


def test_compaction_starts_at_the_threshold_and_keeps_the_current_turn() -> None:
    config = ModelConfig(id="m", provider="builtin", model="echo", context_limit=1000)
    messages = [
        _text("user", "first", 1),
        _text("assistant", "one", 2, input_tokens=660, output_tokens=50),
        _text("user", "second question", 3),
    ]
    assert needs_compaction(config, messages)  # 710+ tokens >= 70 % of 1000
    assert [m.id for m in messages_to_compact(messages)] == [1, 2]

    small = ModelConfig(id="m", provider="builtin", model="echo", context_limit=100_000)
    assert not needs_compaction(small, messages)


def test_a_chat_with_only_the_current_turn_has_nothing_to_compact() -> None:
    config = ModelConfig(id="m", provider="builtin", model="echo", context_limit=10)
    messages = [_text("user", "a long question " * 50, 1)]
    assert messages_to_compact(messages) == []
    assert not needs_compaction(config, messages)


def test_the_summary_request_carries_the_transcript_and_the_part_records_the_range() -> None:
    config = ModelConfig(id="m", provider="builtin", model="echo")
    compacted = [_text("user", "alpha", 4), _text("assistant", "beta", 9)]
    request = summary_request(config, compacted)
    transcript = request.messages[0].content[0]["text"]
    assert "user: alpha" in transcript
    assert "assistant: beta" in transcript
    assert summary_part("S", compacted) == {
        "type": "compaction",
        "summary": "S",
        "compressed_message_ids": [4, 9],
        "compressed_count": 2,
    }
