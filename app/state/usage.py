"""Spend limits: a user whose spend in the current period reached the limit of their
organization (or their own override) cannot start new turns; the API answers 409 with
{message, spent_micros, limit_micros, resets_at}. Spend comes from the cost_micros the worker
records on each assistant (and compaction summary) message, plus the usage no message carries:
title requests and attempts that failed after the provider reported usage (chat_usage). The
chat_spend view is the same sum, row by row, for operators."""

from __future__ import annotations

import uuid

from app.db.queries import Conn, project_queries
from app.errors import SpendLimitReached

Q = project_queries()


async def check_spend_limit(conn: Conn, *, organization_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Raise SpendLimitReached when the user may not start another turn."""
    limit = await conn.fetchrow(Q.sql("usage_effective_spend_limit"), organization_id, user_id)
    if limit is None:
        return
    bounds = await conn.fetchrow(Q.sql("usage_period_bounds"), limit["period"])
    assert bounds is not None
    spent: int = await conn.fetchval(
        Q.sql("usage_spent_since"), organization_id, user_id, bounds["starts_at"]
    )
    if spent >= limit["limit_micros"]:
        raise SpendLimitReached(
            spent_micros=spent,
            limit_micros=limit["limit_micros"],
            resets_at=bounds["resets_at"].isoformat(),
        )
