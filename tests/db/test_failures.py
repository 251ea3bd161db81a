"""Database errors are told apart by SQLSTATE class and asyncpg's connection states
(app/db/): outages and contention are transient everywhere, anything else is a bug."""

from __future__ import annotations

import asyncpg
import pytest

from app.db.failures import DbFailure, classify_db_error, is_outage, is_transient

OUTAGES: list[BaseException] = [
    # A pooled connection whose server sent FATAL mid-operation (seen on `pg_ctl restart`).
    asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    ),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection because of crash"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.exceptions.InterfaceError("pool is closing"),
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError("idle-in-transaction timeout"),
    ConnectionRefusedError(111, "refused"),
    ConnectionResetError(104, "reset by peer"),
    TimeoutError(),  # a deadline on a database wait: a black-holed network never answers
]

CONTENTION: list[BaseException] = [
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
    asyncpg.exceptions.SerializationError("could not serialize access"),
    asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"),
    asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
]

BUGS: list[BaseException] = [
    asyncpg.exceptions.UntranslatableCharacterError("\\u0000 cannot be converted to text"),
    asyncpg.exceptions.UniqueViolationError("duplicate key"),
    asyncpg.exceptions.UndefinedTableError("relation does not exist"),
    asyncpg.exceptions.PostgresSyntaxError("syntax error"),
]


@pytest.mark.parametrize("exc", OUTAGES, ids=lambda e: type(e).__name__)
def test_outages_are_transient(exc: BaseException) -> None:
    assert classify_db_error(exc) is DbFailure.OUTAGE
    assert is_outage(exc)
    assert is_transient(exc)


@pytest.mark.parametrize("exc", CONTENTION, ids=lambda e: type(e).__name__)
def test_contention_is_retried_but_is_no_outage(exc: BaseException) -> None:
    assert classify_db_error(exc) is DbFailure.CONTENTION
    assert not is_outage(exc)
    assert is_transient(exc)


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: type(e).__name__)
def test_anything_else_the_database_refuses_is_a_bug(exc: BaseException) -> None:
    assert classify_db_error(exc) is DbFailure.BUG
    assert not is_transient(exc)


def test_errors_that_did_not_come_from_the_database_are_not_classified() -> None:
    assert classify_db_error(ValueError("no")) is None
    assert classify_db_error(KeyError("x")) is None
    assert not is_transient(RuntimeError("a bug in our code"))
