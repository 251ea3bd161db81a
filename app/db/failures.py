"""What a database error means: an outage (retry, reconnect, requeue), contention (retry) or a
bug (stop). Every room that retries decides with these (docs/reliability.md, "Database
errors")."""

from __future__ import annotations

import enum

import asyncpg

# SQLSTATE classes and codes that mean "the server cannot serve this connection right now".
_OUTAGE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})


# Codes outside those classes after which the server closes the session.
_OUTAGE_CODES = frozenset({"25P03"})  # idle_in_transaction_session_timeout (FATAL)


# SQLSTATE codes that mean "try the same statement again".
_CONTENTION_CODES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout); class 57 is otherwise an outage
    }
)


class DbFailure(enum.Enum):
    """What a database error means for the caller (docs/reliability.md, "Database errors")."""

    # The server or the path to it is gone or going: restart, crash, failover, a cut or
    # black-holed network, a connection the server closed. Transient everywhere: retry,
    # reconnect or requeue; never end a chat in `error`, never stop a replica for it.
    OUTAGE = "outage"
    # The statement lost a race it may win next time: deadlock, serialization failure, lock
    # or statement timeout. Retried.
    CONTENTION = "contention"
    # Anything else the database refused (a constraint, bad data, a missing relation): a bug
    # or a poison input. Retrying the same thing gives the same answer.
    BUG = "bug"


def classify_db_error(exc: BaseException) -> DbFailure | None:
    """The meaning of a database error, by SQLSTATE class and by asyncpg's connection states;
    None when `exc` did not come from talking to the database at all.

    Besides server errors, an outage shows up as: asyncpg's `InterfaceError` (connection closed,
    pool closing), `InternalClientError` ("cannot switch to state ...; another operation is in
    progress": a pooled connection whose server sent FATAL mid-operation), socket errors, and
    `TimeoutError` from a deadline on a database wait (a black-holed network never answers)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if sqlstate in _CONTENTION_CODES:
            return DbFailure.CONTENTION
        if sqlstate[:2] in _OUTAGE_CLASSES or sqlstate in _OUTAGE_CODES:
            return DbFailure.OUTAGE
        return DbFailure.BUG
    if isinstance(
        exc,
        (
            asyncpg.exceptions.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            ConnectionError,
            OSError,
            TimeoutError,
        ),
    ):
        return DbFailure.OUTAGE
    return None


def is_outage(exc: BaseException) -> bool:
    """The database (or the way to it) is gone for now."""
    return classify_db_error(exc) is DbFailure.OUTAGE


def is_transient(exc: BaseException) -> bool:
    """Database trouble that may pass (an outage or contention), as opposed to a bug."""
    return classify_db_error(exc) in (DbFailure.OUTAGE, DbFailure.CONTENTION)
