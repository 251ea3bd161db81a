"""The typed errors of chatd. The data layer raises these (never raw driver errors); the HTTP
middleware maps each class to one status code, so a handler never decides a status itself."""

from __future__ import annotations

from typing import Any


class ChatdError(Exception):
    """Base class. `detail` is safe to show to the caller."""

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(ChatdError):
    """The thing does not exist, or belongs to someone else (we never tell the two apart)."""


class Unauthorized(ChatdError):
    """No credentials, or credentials that do not match a user."""


class Forbidden(ChatdError):
    """Authenticated, but not allowed (admin-only routes)."""


class ValidationFailed(ChatdError):
    """Malformed input. `validations` lists `{field, detail}` per problem."""

    def __init__(
        self,
        message: str,
        *,
        validations: list[dict[str, str]] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, detail=detail)
        self.validations = validations or []


class InvalidTransition(ChatdError):
    """A state-machine transition that the chat's current state does not allow."""

    def __init__(self, *, transition: str, from_status: str, reason: str) -> None:
        super().__init__(
            f"cannot {transition} a chat that is {from_status}: {reason}",
            detail=reason,
        )
        self.transition = transition
        self.from_status = from_status
        self.reason = reason


class Conflict(ChatdError):
    """The request conflicts with the current state of a resource other than a chat's status
    (e.g. deleting a model config that chats still use)."""


class QueueFull(ChatdError):
    """The chat's queue of pending user messages is at its bound."""

    def __init__(self, *, limit: int) -> None:
        super().__init__(f"the chat's message queue is full ({limit} messages)")
        self.limit = limit


class LimitReached(ChatdError):
    """A per-user (or per-parent) limit that keeps one user from slowing down or starving the
    others (docs/reliability.md, "Fairness"). `limit` names the setting, e.g.
    `pending_chats_per_user`; `maximum` is its value."""

    def __init__(self, *, limit: str, maximum: int, message: str) -> None:
        super().__init__(message, detail=f"limit {limit} is {maximum}")
        self.limit = limit
        self.maximum = maximum

    def body(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "detail": self.detail,
            "limit": self.limit,
            "maximum": self.maximum,
        }


class SpendLimitReached(ChatdError):
    """The organization's (or user's) spend over the current period reached its limit."""

    def __init__(self, *, spent_micros: int, limit_micros: int, resets_at: str) -> None:
        super().__init__("spend limit reached")
        self.spent_micros = spent_micros
        self.limit_micros = limit_micros
        self.resets_at = resets_at

    def body(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "spent_micros": self.spent_micros,
            "limit_micros": self.limit_micros,
            "resets_at": self.resets_at,
        }


class FencedOut(ChatdError):
    """A worker's write found that it no longer owns the run (wrong worker or generation)."""
