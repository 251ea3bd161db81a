"""`-- include: triggers/<file>.sql` splices a shipped trigger file into a migration; nothing
outside triggers/ can be included (it would not be in an installed wheel)."""

from __future__ import annotations

import pytest

from app.db.migrate import MigrationError, expand_includes
from app.db.sql_files import TRIGGERS_DIR


def test_an_include_splices_the_trigger_file_in() -> None:
    trigger = (TRIGGERS_DIR / "chats_v1.sql").read_text(encoding="utf-8")
    assert expand_includes("BEGIN;\n-- include: triggers/chats_v1.sql\nEND;") == (
        f"BEGIN;\n{trigger}\nEND;"
    )


@pytest.mark.parametrize(
    "relative", ["triggers/../pyproject.toml", "sql/schema.sql", "/etc/passwd", "triggers/x.txt"]
)
def test_an_include_outside_triggers_is_refused(relative: str) -> None:
    with pytest.raises(MigrationError, match="outside triggers/"):
        expand_includes(f"-- include: {relative}")
