"""Where the SQL of the project lives. The package runs from a checkout (`pip install -e`), so
sql/ and triggers/ are read from the source tree beside app/."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = PROJECT_ROOT / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
QUERIES_DIR = SQL_DIR / "queries"
TRIGGERS_DIR = PROJECT_ROOT / "triggers"
