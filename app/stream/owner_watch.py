"""The chat-list watch: a user's `chat_owner:<user id>` notifications as `created`, `updated`
and `deleted` events, and `resync` when some may have been missed (docs/api.md, "Chat-list
changes")."""

from __future__ import annotations

import json
import uuid

from app.db.listener import Notice, Resync
from app.stream.protocol import Frame, Payload


def owner_channel(user_id: uuid.UUID) -> str:
    return f"chat_owner:{user_id}"


def owner_frame(event: Notice | Resync) -> Frame | None:
    """A chat-list change as a frame: `created`, `updated` (status, title or archived changed)
    or `deleted`, with the chat's new summary; `resync` when notifications may have been lost
    (the client re-lists)."""
    if isinstance(event, Resync):
        reason = "overflow" if event.reason == "overflow" else "reconnected"
        return Frame(
            "resync",
            Payload({"type": "resync", "reason": reason}),
            None,
            final=event.reason == "overflow",
        )
    try:
        notice = json.loads(event.payload)
        kind = notice["type"]
        chat_id = notice["chat_id"]
    except (ValueError, TypeError, KeyError):
        return None
    if kind not in ("created", "updated", "deleted"):
        return None
    return Frame(
        kind,
        Payload(
            {
                "type": kind,
                "chat_id": chat_id,
                "version": notice.get("version"),
                "status": notice.get("status"),
                "title": notice.get("title"),
                "archived": notice.get("archived"),
                "parent_chat_id": notice.get("parent_chat_id"),
            }
        ),
        None,
    )
