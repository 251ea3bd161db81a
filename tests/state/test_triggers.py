"""Every chat notification comes from a trigger. These tests change rows the way chatd does (and
the way an operator in psql would) and assert the exact notifications, channels and payloads."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests import factories
from tests.notifications import NotificationRecorder, Received


@pytest.fixture
async def recorder(database_url: str) -> AsyncIterator[NotificationRecorder]:
    listen_conn = await asyncpg.connect(database_url)
    try:
        yield NotificationRecorder(listen_conn)
    finally:
        await listen_conn.close()


def _payloads(received: list[Received], channel: str) -> list[dict[str, object]]:
    return [item.json() for item in received if item.channel == channel]


async def test_inserting_a_pending_chat_wakes_replicas_and_tells_chat_and_owner(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    user = await factories.create_user(conn)
    await recorder.listen("chat_wake", f"chat_owner:{user['id']}")

    chat = await factories.create_chat(conn, owner_id=user["id"], status="pending", title="t")

    received = await recorder.drain_after_barrier(conn)
    assert [(r.channel, r.payload) for r in received if r.channel == "chat_wake"] == [
        ("chat_wake", str(chat["id"]))
    ]
    assert _payloads(received, f"chat_owner:{user['id']}") == [
        {
            "type": "created",
            "chat_id": str(chat["id"]),
            "version": 1,
            "status": "pending",
            "title": "t",
            "archived": False,
            "parent_chat_id": None,
        }
    ]


async def test_status_update_notifies_the_chat_channel_with_new_version(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn, status="pending")
    await recorder.listen(f"chat:{chat['id']}", "chat_wake")
    worker_id = uuid.uuid4()

    await conn.execute(
        "UPDATE chats SET status = 'running', worker_id = $2, generation = generation + 1"
        " WHERE id = $1",
        chat["id"],
        worker_id,
    )

    received = await recorder.drain_after_barrier(conn)
    assert _payloads(received, f"chat:{chat['id']}") == [
        {
            "type": "chat",
            "chat_id": str(chat["id"]),
            "version": 2,
            "status": "running",
            "worker_id": str(worker_id),
            "generation": 1,
            "interrupt_requested": False,
            "archived": False,
        }
    ]
    assert _payloads(received, "chat_wake") == [], "running is not a wake-up"


async def test_requeue_to_pending_wakes_replicas_but_staying_pending_does_not(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn, status="running", worker_id=uuid.uuid4())
    await recorder.listen("chat_wake")

    await conn.execute(
        "UPDATE chats SET status = 'pending', worker_id = NULL WHERE id = $1", chat["id"]
    )
    await conn.execute("UPDATE chats SET title = 'still pending' WHERE id = $1", chat["id"])

    received = await recorder.drain_after_barrier(conn)
    assert [r.payload for r in received] == [str(chat["id"])]


async def test_heartbeat_only_updates_do_not_reach_the_owner_watch_channel(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn, status="running", worker_id=uuid.uuid4())
    await recorder.listen(f"chat_owner:{chat['owner_id']}")

    await conn.execute("UPDATE chats SET heartbeat_at = now() WHERE id = $1", chat["id"])
    await conn.execute("UPDATE chats SET title = 'renamed' WHERE id = $1", chat["id"])

    received = await recorder.drain_after_barrier(conn)
    assert [
        (p["type"], p["title"], p["version"])
        for p in _payloads(received, f"chat_owner:{chat['owner_id']}")
    ] == [("updated", "renamed", 3)]


async def test_version_strictly_increases_on_every_update_even_by_hand(
    conn: asyncpg.Connection,
) -> None:
    chat = await factories.create_chat(conn)
    versions = [chat["version"]]
    # A hand-written UPDATE that tries to set the version itself, one that changes nothing, and
    # an ordinary one: each one still bumps it by exactly one.
    for statement in (
        "UPDATE chats SET version = 1 WHERE id = $1",
        "UPDATE chats SET title = title WHERE id = $1",
        "UPDATE chats SET archived = true WHERE id = $1",
        "UPDATE chats SET version = version - 5 WHERE id = $1",
    ):
        await conn.execute(statement, chat["id"])
        versions.append(await conn.fetchval("SELECT version FROM chats WHERE id = $1", chat["id"]))
    assert versions == [1, 2, 3, 4, 5]


async def test_message_insert_notifies_once_per_statement_with_the_highest_id(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn)
    await recorder.listen(f"chat:{chat['id']}")

    ids = await conn.fetch(
        """
        INSERT INTO chat_messages (chat_id, role, content)
        SELECT $1, 'assistant', '[]'::jsonb FROM generate_series(1, 3)
        RETURNING id
        """,
        chat["id"],
    )

    received = await recorder.drain_after_barrier(conn)
    assert _payloads(received, f"chat:{chat['id']}") == [
        {
            "type": "message",
            "chat_id": str(chat["id"]),
            "message_id": max(r["id"] for r in ids),
            "version": 1,
        }
    ]


async def test_soft_delete_sends_history_reset_from_the_first_deleted_id(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn)
    messages = [
        await factories.create_message(conn, chat_id=chat["id"], text=f"m{i}") for i in range(4)
    ]
    await recorder.listen(f"chat:{chat['id']}")

    await conn.execute(
        "UPDATE chat_messages SET deleted = true WHERE chat_id = $1 AND id >= $2",
        chat["id"],
        messages[1]["id"],
    )
    # Flags that are not deletions send nothing.
    await conn.execute(
        "UPDATE chat_messages SET compressed = true WHERE id = $1", messages[0]["id"]
    )

    received = await recorder.drain_after_barrier(conn)
    assert _payloads(received, f"chat:{chat['id']}") == [
        {
            "type": "history_reset",
            "chat_id": str(chat["id"]),
            "from_message_id": messages[1]["id"],
            "version": 1,
        }
    ]


async def test_queue_insert_and_delete_notify_the_chat(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn)
    await recorder.listen(f"chat:{chat['id']}")

    queued = await factories.create_queued_message(conn, chat_id=chat["id"])
    await conn.execute("DELETE FROM chat_queued_messages WHERE id = $1", queued["id"])

    received = await recorder.drain_after_barrier(conn)
    expected = {"type": "queue", "chat_id": str(chat["id"]), "version": 1}
    assert _payloads(received, f"chat:{chat['id']}") == [expected, expected]


async def test_one_multi_chat_part_insert_sends_one_notification_per_chat(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    first = await factories.create_chat(conn, status="running", worker_id=uuid.uuid4())
    second = await factories.create_chat(conn, status="running", worker_id=uuid.uuid4())
    await recorder.listen(f"chat:{first['id']}", f"chat:{second['id']}")

    rows = await conn.fetch(
        """
        INSERT INTO chat_stream_parts (chat_id, generation, part)
        SELECT chat_id, 7, '{"type": "text", "text": "x"}'::jsonb
        FROM unnest($1::uuid[]) AS chat_id, generate_series(1, 3)
        RETURNING id, chat_id
        """,
        [first["id"], second["id"]],
    )

    received = await recorder.drain_after_barrier(conn)
    for chat in (first, second):
        assert _payloads(received, f"chat:{chat['id']}") == [
            {
                "type": "parts",
                "chat_id": str(chat["id"]),
                "part_id": max(r["id"] for r in rows if r["chat_id"] == chat["id"]),
                "generation": 7,
            }
        ]
    # Deleting parts (their step got persisted) is silent: the message notification covers it.
    await conn.execute("DELETE FROM chat_stream_parts WHERE chat_id = $1", first["id"])
    assert await recorder.drain_after_barrier(conn) == []


async def test_rolled_back_changes_send_nothing(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn)
    await recorder.listen(f"chat:{chat['id']}", "chat_wake", f"chat_owner:{chat['owner_id']}")

    tx = conn.transaction()
    await tx.start()
    await conn.execute("UPDATE chats SET status = 'pending' WHERE id = $1", chat["id"])
    await factories.create_message(conn, chat_id=chat["id"])
    await factories.create_queued_message(conn, chat_id=chat["id"])
    await factories.create_stream_part(conn, chat_id=chat["id"])
    await tx.rollback()

    assert await recorder.drain_after_barrier(conn) == []


async def test_notifications_arrive_only_after_commit_and_in_commit_order(
    database_url: str, conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    first_chat = await factories.create_chat(conn)
    second_chat = await factories.create_chat(conn)
    await recorder.listen("chat_wake")
    other = await asyncpg.connect(database_url)
    try:
        # Transaction A changes its row first but commits second.
        tx_a = conn.transaction()
        await tx_a.start()
        await conn.execute("UPDATE chats SET status = 'pending' WHERE id = $1", first_chat["id"])
        async with other.transaction():
            await other.execute(
                "UPDATE chats SET status = 'pending' WHERE id = $1", second_chat["id"]
            )
        # B committed: its notification arrives while A is still open, A's is not there yet.
        assert (await recorder.next()).payload == str(second_chat["id"])
        assert recorder.queue.empty()
        await tx_a.commit()
    finally:
        await other.close()

    received = await recorder.drain_after_barrier(conn)
    assert [r.payload for r in received] == [str(first_chat["id"])]


async def test_deleting_a_chat_tells_its_channel_and_its_owner(
    conn: asyncpg.Connection, recorder: NotificationRecorder
) -> None:
    chat = await factories.create_chat(conn)
    await recorder.listen(f"chat:{chat['id']}", f"chat_owner:{chat['owner_id']}")

    await conn.execute("DELETE FROM chats WHERE id = $1", chat["id"])

    received = await recorder.drain_after_barrier(conn)
    assert [(r.channel, r.json()["type"]) for r in received] == [
        (f"chat:{chat['id']}", "deleted"),
        (f"chat_owner:{chat['owner_id']}", "deleted"),
    ]
