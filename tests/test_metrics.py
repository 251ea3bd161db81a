"""`/metrics` is produced by prometheus_client, and what an operator asks first moves when a
chat is answered: turns and steps by outcome, retries by kind and provider, time to first token
and step duration, acquire latency, part flushes, runs in progress, stream clients and hub
reads, the pool in use, listener reconnects (docs/operations.md, "Metrics")."""

from __future__ import annotations

import asyncio
import re
import uuid

import asyncpg
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from app import instruments
from app.db.sql_files import PROJECT_ROOT
from app.http.server import build_app
from app.metrics import engine_metrics
from app.providers import retry
from app.state import chats
from tests import engine_harness, factories
from tests.fakes import HttpError, RecordedRequest, Step, ToolUse, running
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.scenarios import kind_of
from tests.http_harness import SimulatedWorker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_move_when_a_chat_is_answered_after_a_retry_and_a_tool_step(
    database_url: str, pool: asyncpg.Pool
) -> None:
    answers = iter(
        [
            HttpError(529, "overloaded_error", "busy"),
            Step(tool_calls=(ToolUse("toolu_1", "add", {"a": 1, "b": 2}),)),
            Step(text="one and two make three"),
        ]
    )

    def respond(request: RecordedRequest) -> object:
        return Step(text="Sums") if kind_of(request) == "title" else next(answers)

    owner = await factories.create_owner(pool)
    server = FakeAnthropicServer(responder=respond)  # type: ignore[arg-type]
    async with (
        running(server),
        engine_harness.running_replica(
            database_url, pool, stream_step=retry.stream_step
        ) as replica,
    ):
        app = build_app(
            settings=replica.settings,
            pool=pool,
            listener=replica.listener,
            metrics=[engine_metrics(replica)],
        )
        async with TestClient(TestServer(app)) as client:

            async def scrape() -> tuple[str, Samples]:
                async with client.get("/metrics") as response:
                    assert response.status == 200
                    text = await response.text()
                    return response.headers["Content-Type"], _parse(text)

            _, before = await scrape()
            model = await factories.create_fake_model_config(pool, server.base_url)
            chat, _ = await chats.create_chat(pool, owner, "1 + 2?", model_config_id=model)
            await engine_harness.wait_status(pool, chat.id, "waiting", timeout_s=30)
            content_type, after = await scrape()

    assert content_type.startswith("text/plain; version=")

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    # The instruments are process-wide (one process is one replica), so in a suite another
    # test's replica may have moved them too: each must have moved at least this much.
    anthropic = {"provider": "anthropic"}
    assert moved("chatd_turns_total", outcome="answered") >= 1
    assert moved("chatd_steps_total", outcome="tool_use") >= 1
    assert moved("chatd_steps_total", outcome="end_turn") >= 1
    assert moved("chatd_provider_retries_total", provider="anthropic", kind="overloaded") >= 1
    assert moved("chatd_provider_time_to_first_token_seconds_count", **anthropic) >= 2
    assert moved("chatd_step_duration_seconds_count", **anthropic) >= 2
    assert moved("chatd_step_duration_seconds_sum", **anthropic) > 0
    assert moved("chatd_acquire_latency_seconds_count") >= 1
    assert moved("chatd_part_flush_duration_seconds_count") >= 1
    assert moved("chatd_part_flush_parts_sum") >= 3  # tool call, tool result, answer words
    # The replica's own snapshot counter is this test's alone.
    assert moved("chatd_runs_acquired_total") == 1
    # Snapshot gauges and counters are there, with their current values.
    for name in (
        "chatd_runs_running",
        "chatd_db_pool_in_use",
        "chatd_db_pool_connections",
        "chatd_listener_reconnects_total",
        "chatd_listener_connected",
        "chatd_stream_clients",
        "chatd_stream_hub_reads_total",
    ):
        assert any(key[0] == name for key in after), f"{name} is missing"
    assert _value(after, "chatd_listener_connected") == 1
    # prometheus_client's own process metrics come along.
    assert any(key[0] == "process_cpu_seconds_total" for key in after)


async def test_stream_clients_and_hub_reads_move_with_a_watcher(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with engine_harness.running_listener(database_url) as listener:
        settings = engine_harness.settings()
        app = build_app(settings=settings, pool=pool, listener=listener)
        async with TestClient(TestServer(app)) as client:
            user = await factories.create_api_user(pool)
            async with client.post(
                "/api/v1/chats", json={"content": "hello"}, headers=user.headers
            ) as response:
                chat_id = uuid.UUID((await response.json())["id"])

            async def samples() -> Samples:
                async with client.get("/metrics") as response:
                    return _parse(await response.text())

            before = await samples()
            async with client.get(
                f"/api/v1/chats/{chat_id}/stream", headers=user.headers
            ) as stream:
                assert stream.status == 200
                await asyncio.wait_for(stream.content.readline(), timeout=10)
                during = await samples()
            assert (
                _value(during, "chatd_stream_clients") == _value(before, "chatd_stream_clients") + 1
            )
            assert _value(during, "chatd_stream_hub_reads_total") > _value(
                before, "chatd_stream_hub_reads_total"
            )


def test_every_metric_is_documented_in_operations_md() -> None:
    """docs/operations.md lists each metric chatd exposes (instruments and snapshots)."""
    names = {
        family.name
        for instrument in vars(instruments).values()
        if isinstance(instrument, MetricWrapperBase)
        for family in instrument.describe()
    }
    source = (PROJECT_ROOT / "app" / "metrics.py").read_text()
    names |= set(re.findall(r'"(chatd_[a-z_]+)"', source))
    documented = (PROJECT_ROOT / "docs" / "operations.md").read_text()
    missing = sorted(name for name in names if f"`{name.removesuffix('_total')}" not in documented)
    assert len(names) > 30
    assert missing == []


async def test_chats_waiting_for_their_clients_are_counted_at_scrape(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with engine_harness.running_listener(database_url) as listener:
        app = build_app(settings=engine_harness.settings(), pool=pool, listener=listener)
        async with TestClient(TestServer(app)) as client:
            user = await factories.create_api_user(pool)

            async def waiting() -> float:
                async with client.get("/metrics") as response:
                    return _value(_parse(await response.text()), "chatd_chats_requires_action")

            assert await waiting() == 0
            for _ in range(2):
                async with client.post(
                    "/api/v1/chats", json={"content": "use my tool"}, headers=user.headers
                ) as response:
                    chat_id = uuid.UUID((await response.json())["id"])
                worker = SimulatedWorker(pool, chat_id)
                await worker.acquire()
                await worker.require_action(
                    [{"id": f"call_{chat_id.hex[:8]}", "name": "pick", "args": {}}]
                )
            assert await waiting() == 2
