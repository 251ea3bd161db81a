"""What a step produced (app/engine/step.py, StepOutput): deltas merged into parts in the
persisted shape, readable at any point, voided by clearing `content`."""

from __future__ import annotations

from app.engine.step import StepOutput
from app.providers.base import ModelConfig, ToolCall

CONFIG = ModelConfig(id="m", provider="builtin", model="echo")


def test_consecutive_deltas_of_a_kind_make_one_part() -> None:
    output = StepOutput()
    output.add_delta("reasoning", "think", "")
    output.add_delta("reasoning", "ing", "sig")
    for word in ["echo:", " a", " b"]:
        output.add_delta("text", word)
    assert output.record(CONFIG).assistant_content == [
        {"type": "reasoning", "text": "thinking", "signature": "sig"},
        {"type": "text", "text": "echo: a b"},
    ]


def test_content_is_complete_mid_step_and_the_part_goes_on_after_a_read() -> None:
    output = StepOutput()
    output.add_delta("text", "a")
    output.add_delta("text", "b")
    assert output.content == [{"type": "text", "text": "ab"}]
    output.add_delta("text", "c")
    assert output.content == [{"type": "text", "text": "abc"}]


def test_a_tool_call_ends_the_text_part_before_it() -> None:
    output = StepOutput()
    output.add_delta("text", "let me")
    output.add_delta("text", " add")
    output.add_tool_call(ToolCall(id="c1", name="add", args={"a": 1}))
    output.add_delta("text", "done")
    assert output.record(CONFIG).assistant_content == [
        {"type": "text", "text": "let me add"},
        {"type": "tool_call", "id": "c1", "name": "add", "args": {"a": 1}},
        {"type": "text", "text": "done"},
    ]


def test_clearing_content_voids_the_attempt_including_unjoined_deltas() -> None:
    output = StepOutput()
    output.add_delta("text", "failed")
    output.add_delta("text", " attempt")
    output.content.clear()  # what the run does on a retry
    output.add_delta("text", "fresh")
    assert output.record(CONFIG).assistant_content == [{"type": "text", "text": "fresh"}]
