"""The terminal client's renderer: a step's message completes what its live parts showed."""

from __future__ import annotations

import io

from app.terminal import Renderer, ask_user_question_result, typed_result


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


def test_live_tool_results_are_not_printed_again_by_their_message() -> None:
    renderer, out, _ = _renderer()
    result = {"type": "tool_result", "tool_call_id": "c1", "name": "add", "result": 3}
    renderer.part(result)
    other = {"type": "tool_result", "tool_call_id": "c2", "name": "pick", "result": "x"}
    renderer.message({"role": "tool", "content": [result, other]})
    assert out.getvalue() == '  ↳ add: 3\n  ↳ pick: "x"\n'


def test_what_the_user_types_becomes_the_result() -> None:
    args = {"question": "Which?", "choices": ["red", "blue"]}
    assert ask_user_question_result(args, "2") == {"answer": "blue"}
    assert ask_user_question_result(args, "3") == {"answer": "3"}  # not a choice: verbatim
    assert ask_user_question_result({"question": "Why?"}, "1") == {"answer": "1"}
    assert ask_user_question_result(args, "green, really") == {"answer": "green, really"}
    assert typed_result('{"a": [1]}') == ({"a": [1]}, False)
    assert typed_result("plain words") == ("plain words", False)
    assert typed_result("!no access") == ("no access", True)
