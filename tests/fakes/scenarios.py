"""Responders for the fake Anthropic server: "models" that answer each request from what it
carries, so that several chats (a parent and its sub-agents) can share one server in whatever
order their replicas call it."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from app.engine.compaction import SUMMARY_SYSTEM_PROMPT
from app.engine.titles import TITLE_SYSTEM_PROMPT
from tests.fakes import Behaviour, HttpError, RecordedRequest, SlowStart, Step, ToolUse
from tests.fakes.anthropic_server import answered_tool_results, first_user_text, system_text

PARENT_PROMPT = "PARENT: ask two helpers and report what they found"
CHILD_NAMES = ("alpha", "beta")
PARENT_TITLE = "Helpers report"


def child_prompt(name: str) -> str:
    return f"CHILD {name}: find the number"


def child_answer(name: str) -> str:
    return f"{name} found {len(name) * 7}"


def kind_of(request: RecordedRequest) -> str:
    """title | summary | step: a title request, a compaction summary, or a chat's step."""
    system = system_text(request.body)
    if system.startswith(TITLE_SYSTEM_PROMPT):
        return "title"
    if system.startswith(SUMMARY_SYSTEM_PROMPT):
        return "summary"
    return "step"


def chat_of(request: RecordedRequest) -> str:
    """parent | child: whose step a request of the sub-agent scenario is."""
    return "parent" if first_user_text(request.body).startswith("PARENT") else "child"


@dataclass
class SubagentScenario:
    """The parent spawns two children in one step (two parallel spawn_agent calls), then waits
    for both (the ids read from the spawn results), then answers quoting what they said. Each
    child answers its prompt in one step; while `hold_children` is clear, children's answers
    are held after their headers (the e2e test kills the parent's replica meanwhile)."""

    hold_children: asyncio.Event | None = None
    spawned: list[str] = field(default_factory=list)

    def __call__(self, request: RecordedRequest) -> Behaviour:
        kind = kind_of(request)
        if kind == "title":
            return Step(text=f'"{PARENT_TITLE}."')
        if kind == "summary":
            return HttpError(400, "invalid_request_error", "no compaction in this scenario")
        if chat_of(request) == "child":
            name = first_user_text(request.body).split()[1].rstrip(":")
            step = Step(text=child_answer(name))
            if self.hold_children is not None:
                return SlowStart(step, release=self.hold_children)
            return step
        return self._parent_step(request)

    def _parent_step(self, request: RecordedRequest) -> Behaviour:
        results = answered_tool_results(request.body)
        if not results:
            return Step(
                tool_calls=tuple(
                    ToolUse(
                        f"toolu_spawn_{name}",
                        "spawn_agent",
                        {"prompt": child_prompt(name), "title": f"helper {name}"},
                    )
                    for name in CHILD_NAMES
                )
            )
        names = {name for name, _ in results}
        if names == {"spawn_agent"}:
            ids = [json.loads(block["content"])["chat_id"] for _, block in results]
            self.spawned = ids
            return Step(
                text="Both helpers are working; waiting for them.",
                tool_calls=(
                    ToolUse("toolu_wait", "wait_agent", {"chat_ids": ids, "timeout_s": 60}),
                ),
            )
        if names == {"wait_agent"}:
            (block,) = (block for _, block in results)
            agents = json.loads(block["content"])["agents"]
            answers = " | ".join(agent.get("answer", "?") for agent in agents)
            return Step(text=f"The helpers said: {answers}")
        return HttpError(400, "invalid_request_error", f"unexpected tool results {names}")
