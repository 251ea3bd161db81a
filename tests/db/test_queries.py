from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from app.db.queries import Queries
from app.db.sql_files import PROJECT_ROOT, QUERIES_DIR, sql_files


def test_named_blocks_are_split_at_headers(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text(
        "-- name: first :one\n-- why it looks like this\nSELECT 1;\n\n"
        "-- name: second :many\nSELECT 2\nFROM x;\n"
    )
    queries = Queries.load(tmp_path)
    assert queries.names() == ["first", "second"]
    assert queries.sql("first") == "-- why it looks like this\nSELECT 1;"
    assert queries.sql("second") == "SELECT 2\nFROM x;"


def test_a_name_defined_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- name: same\nSELECT 1;\n")
    (tmp_path / "b.sql").write_text("-- name: same\nSELECT 2;\n")
    with pytest.raises(ValueError, match=r"defined in a\.sql and b\.sql"):
        Queries.load(tmp_path)


def test_an_unknown_name_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- name: known\nSELECT 1;\n")
    with pytest.raises(KeyError, match="no query named 'unknown'"):
        Queries.load(tmp_path).sql("unknown")


def test_the_project_queries_load() -> None:
    Queries.load()


_QUERY_HEADER = re.compile(r"^-- name: (\w+)", re.MULTILINE)
_QUERY_CALL = re.compile(r"""\bQ\.sql\(\s*["'](\w+)["']\s*\)""")


def _misplaced_names(files: dict[str, str]) -> list[str]:
    """`file.sql: name` for each query whose name does not start with its file's name and `_`
    (the name alone then says which file holds the query, and which room runs it)."""
    return [
        f"{file}: {name}"
        for file, text in files.items()
        for name in _QUERY_HEADER.findall(text)
        if not name.startswith(file.removesuffix(".sql") + "_")
    ]


def _unused_names(files: dict[str, str], sources: list[str]) -> list[str]:
    """The queries no `Q.sql("<name>")` of the given source texts runs."""
    called = {name for source in sources for name in _QUERY_CALL.findall(source)}
    return sorted(
        name
        for text in files.values()
        for name in _QUERY_HEADER.findall(text)
        if name not in called
    )


def _project_query_files() -> dict[str, str]:
    return {path.name: path.read_text() for path in sql_files(QUERIES_DIR)}


def test_every_query_name_starts_with_its_file_name() -> None:
    assert _misplaced_names(_project_query_files()) == []
    # The check itself sees a misplaced name.
    planted = {"runs.sql": "-- name: runs_ok :one\n-- name: run_bad :one\n"}
    assert _misplaced_names(planted) == ["runs.sql: run_bad"]


def test_every_query_is_run_by_the_application() -> None:
    """A query only tests or benchmarks use is dead code: the application never runs it."""
    sources = [path.read_text() for path in (PROJECT_ROOT / "app").rglob("*.py")]
    assert _unused_names(_project_query_files(), sources) == []
    # The check itself sees an unused query, and a call split over lines.
    planted = {"a.sql": "-- name: a_used :one\n-- name: a_unused :many\n"}
    assert _unused_names(planted, ['Q.sql(\n    "a_used"\n)']) == ["a_unused"]


def _code_strings(source: str) -> list[tuple[int, str]]:
    """String literals of a module that are not docstrings (what could reach the database)."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_python_code_never_sends_chat_notifications() -> None:
    """Triggers emit every chat notification; application code only LISTENs. Comments and
    docstrings may talk about NOTIFY; no string that could be executed may contain it."""
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line}"
        for path in (PROJECT_ROOT / "app").rglob("*.py")
        for line, text in _code_strings(path.read_text())
        if re.search(r"pg_notify|\bNOTIFY\b", text, re.IGNORECASE)
    ]
    assert offenders == []
    # The check itself sees strings: a planted offender is found.
    assert _code_strings('x = "SELECT pg_notify(1)"') == [(1, "SELECT pg_notify(1)")]
    assert _code_strings('"""NOTIFY in a docstring"""') == []


def _rooms_running(files: dict[str, str], sources: dict[str, str]) -> dict[str, set[str]]:
    """For each query file, the modules (`app/...py`) that run one of its queries."""
    runs = {path: set(_QUERY_CALL.findall(text)) for path, text in sources.items()}
    return {
        file: {path for path, called in runs.items() if called & set(_QUERY_HEADER.findall(text))}
        for file, text in files.items()
    }


def _misfiled(files: dict[str, str], sources: dict[str, str]) -> list[str]:
    """Query files not run by exactly one room named like them: the module `<file>.py`, or a
    module of the package `<file>/` (one file per room: a newcomer finds a room's SQL by name)."""
    wrong = []
    for file, modules in _rooms_running(files, sources).items():
        stem = file.removesuffix(".sql")
        named = {m for m in modules if Path(m).stem == stem or Path(m).parent.name == stem}
        if len(modules) != 1 or named != modules:
            wrong.append(f"{file}: {sorted(modules)}")
    return wrong


def test_each_query_file_belongs_to_one_room_of_its_name() -> None:
    sources = {
        str(path.relative_to(PROJECT_ROOT)): path.read_text()
        for path in (PROJECT_ROOT / "app").rglob("*.py")
    }
    assert _misfiled(_project_query_files(), sources) == []
    # The check itself sees a query file run by a room of another name, and by two rooms.
    planted = {"runs.sql": "-- name: runs_a :one\n", "parts.sql": "-- name: parts_b :one\n"}
    planted_sources = {
        "app/state/runs.py": 'Q.sql("runs_a")',
        "app/engine/chatloop.py": 'Q.sql("runs_a")',
        "app/stream/parts_reader.py": 'Q.sql("parts_b")',
    }
    assert _misfiled(planted, planted_sources) == [
        "runs.sql: ['app/engine/chatloop.py', 'app/state/runs.py']",
        "parts.sql: ['app/stream/parts_reader.py']",
    ]


# What would outlive a transaction on a pooled connection (the pool does not reset sessions,
# app/db/connections.py `_keep_session`). Only the liveness queries, which run on the replica's
# own connection, may hold a session advisory lock.
_SESSION_STATE = re.compile(
    r"pg_(try_)?advisory_lock(_shared)?\s*\(|\bLISTEN\b|set_config\s*\([^)]*,\s*false\s*\)",
    re.IGNORECASE,
)
_OWN_CONNECTION_FILES = {"liveness.sql"}


def _session_state(files: dict[str, str]) -> list[str]:
    return [
        f"{file}: {name}"
        for file, text in files.items()
        if file not in _OWN_CONNECTION_FILES
        for name, body in re.findall(r"^-- name: (\w+).*?$(.*?)(?=^-- name:|\Z)", text, re.M | re.S)
        if _SESSION_STATE.search(
            "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--"))
        )
    ]


def test_pooled_queries_leave_no_session_state() -> None:
    assert _session_state(_project_query_files()) == []
    planted = {
        "runs.sql": "-- name: runs_a :one\nSELECT set_config('lock_timeout', '1s', false);\n"
        "-- name: runs_b :one\n-- pg_advisory_lock( in a comment is fine\nSELECT 1;\n",
        "liveness.sql": "-- name: liveness_c :one\nSELECT pg_try_advisory_lock(1, 2);\n",
    }
    assert _session_state(planted) == ["runs.sql: runs_a"]
