"""`chatd status` (tables, or one JSON object with --json) and the log formats (event key=value
lines, or JSON lines for log shippers with CHATD_LOG_FORMAT=json)."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta

import asyncpg
import pytest

from app import cli
from app.config import Settings, log_level_of
from app.log import JsonFormatter, get_logger
from tests import factories


async def test_status_prints_chats_by_status_and_replicas_as_tables(
    database_url: str, pool: asyncpg.Pool
) -> None:
    empty = await cli._status(database_url, as_json=False)
    assert "(no chats yet)" in empty and "(no replica is running)" in empty
    async with pool.acquire() as conn:
        for status in ("waiting", "waiting", "pending"):
            await factories.create_chat(conn, status=status)
    await factories.create_replica_row(
        pool, hostname="host-a", pid=4242, address="http://10.0.0.7:8080", heartbeat_age_s=5.8
    )
    text = await cli._status(database_url, as_json=False)
    lines = text.splitlines()
    assert lines[0].split() == ["STATUS", "ARCHIVED", "CHATS", "OLDEST", "CHANGE"]
    assert lines[1].split()[:3] == ["pending", "no", "1"]
    assert lines[2].split()[:3] == ["waiting", "no", "2"]
    replica = next(line for line in lines if "host-a" in line).split()
    assert replica[2:4] == ["4242", "http://10.0.0.7:8080"]
    assert replica[4].endswith("s") and 5.7 <= float(replica[4][:-1]) < 60  # "5.8s ago"
    assert "heartbeat_age=" not in text and "0:00:" not in text

    data = json.loads(await cli._status(database_url, as_json=True))
    assert {(c["status"], c["chats"]) for c in data["chats"]} == {("pending", 1), ("waiting", 2)}
    (row,) = data["replicas"]
    assert row["hostname"] == "host-a" and row["pid"] == 4242
    assert row["heartbeat_age_s"] >= 5.8


@pytest.mark.parametrize(
    ("age", "shown"),
    [
        (timedelta(milliseconds=850), "850ms"),
        (timedelta(seconds=5.785515), "5.8s"),
        (timedelta(minutes=3, seconds=12), "3m12s"),
        (timedelta(hours=2, minutes=5), "2h05m"),
        (timedelta(days=3, hours=4), "3d04h"),
        (None, "-"),
    ],
)
def test_durations_read_like_durations(age: timedelta | None, shown: str) -> None:
    assert cli._age(age) == shown


def test_json_logs_are_one_object_per_line_with_the_event_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("chatd.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        get_logger("chatd.test.json").info("run.started", chat_id="c1", generation=3)
        logger.warning("a library's %s", "message")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "run.started" and first["level"] == "INFO"
    assert (first["chat_id"], first["generation"]) == ("c1", 3)
    assert first["logger"] == "chatd.test.json" and first["time"].endswith("Z")
    assert second["message"] == "a library's message" and "event" not in second


def test_the_default_log_level_is_quiet_for_the_embedded_database_only() -> None:
    assert log_level_of(Settings()) == "WARNING"
    assert log_level_of(Settings(database_url="postgresql://db/chatd")) == "INFO"
    assert log_level_of(Settings(log_level="DEBUG")) == "DEBUG"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHATD_LOG_FORMAT": "xml"}, "CHATD_LOG_FORMAT must be text or json"),
        ({"CHATD_LOG_LEVEL": "LOUD"}, "CHATD_LOG_LEVEL 'LOUD' is not a log level"),
    ],
)
def test_bad_log_settings_are_refused_clearly(
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["status"]) == 2
    assert message in capsys.readouterr().err
