"""The terminal client's renderer: a step's message completes what its live parts showed."""

from __future__ import annotations

import io

from app.terminal import Renderer


def _renderer() -> tuple[Renderer, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Renderer(out=out, err=err), out, err


def test_a_message_prints_what_the_stream_never_showed_as_parts() -> None:
    # The step was persisted (and its parts deleted) before the stream read its last part.
    renderer, out, _ = _renderer()
    renderer.part({"type": "text", "text": "echo:"})
    renderer.message({"role": "assistant", "content": [{"type": "text", "text": "echo: more"}]})
    assert out.getvalue() == "echo: more\n"


def test_a_fully_streamed_step_is_not_printed_twice() -> None:
    renderer, out, _ = _renderer()
    call = {"type": "tool_call", "id": "c1", "name": "add", "args": {"a": 1}}
    renderer.part({"type": "text", "text": "sum"})
    renderer.part(call)
    renderer.message({"role": "assistant", "content": [{"type": "text", "text": "sum"}, call]})
    renderer.part({"type": "text", "text": "next"})
    renderer.message({"role": "assistant", "content": [{"type": "text", "text": "next"}]})
    assert out.getvalue() == 'sum\n→ add({"a": 1})\nnext\n'


def test_a_joined_late_step_and_a_compaction_record() -> None:
    renderer, out, err = _renderer()
    renderer.message(
        {"role": "system", "content": [{"type": "compaction", "summary": "s"}]},
    )
    renderer.message({"role": "assistant", "content": [{"type": "text", "text": "whole"}]})
    assert out.getvalue() == "whole\n"
    assert "summarized" in err.getvalue()
