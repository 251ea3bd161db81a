from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from app.db import Queries
from app.paths import PROJECT_ROOT


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
