from __future__ import annotations

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


def test_python_code_never_sends_chat_notifications() -> None:
    """Triggers emit every chat notification; application code only LISTENs."""
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{number}"
        for path in (PROJECT_ROOT / "app").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"pg_notify|\bNOTIFY\b", line, re.IGNORECASE)
        and not line.lstrip().startswith("#")
        and '"""' not in line
    ]
    assert offenders == []
