"""Where the SQL of the project lives: the one place that knows the two layouts chatd runs from.

- A checkout (`make run`, `pip install -e .`, the tests): sql/ and triggers/ at the top of the
  repository, beside app/, where they are written and reviewed.
- An installed package (`pip install .`, a wheel, a container image): the same files inside the
  package as app/_sql and app/_triggers (pyproject.toml maps them there), so that the installed
  `chatd` can migrate and run its queries without a checkout.

The files are read through importlib.resources. The packaged copy wins when it is there; a
checkout never has one (app/_sql exists only in a built wheel), so a checkout reads its own
sql/, never the copy of another checkout that an editable finder may know about. Either way
the bytes are those of the repository's files, so migration checksums are the same."""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

# The checkout's root when chatd runs from one (tests and `make run` use it for cwd and for
# reading app/ sources); meaningless in an installed package, where nothing reads it at run time.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

_PACKAGE = files("app")


def _packaged_or_checkout(packaged: str, checkout: str) -> Traversable:
    installed = _PACKAGE / packaged
    if installed.is_dir():
        return installed
    return PROJECT_ROOT / checkout


SQL_DIR = _packaged_or_checkout("_sql", "sql")
MIGRATIONS_DIR = SQL_DIR / "migrations"
QUERIES_DIR = SQL_DIR / "queries"
TRIGGERS_DIR = _packaged_or_checkout("_triggers", "triggers")

# What a migration may include: `-- include: triggers/<file>.sql`, written relative to the
# repository root; nothing else (no subdirectories, no `..`), so an include cannot reach
# outside the shipped files in either layout.
_TRIGGER_INCLUDE = re.compile(r"^triggers/(?P<file>[a-z0-9_]+\.sql)$")


def sql_files(directory: Traversable) -> list[Traversable]:
    """The *.sql files of a directory, in name order (migrations apply in this order)."""
    return sorted(
        (entry for entry in directory.iterdir() if entry.name.endswith(".sql") and entry.is_file()),
        key=lambda entry: entry.name,
    )


def include_file(relative: str) -> Traversable | None:
    """The file a `-- include: triggers/<file>.sql` line names, or None if it names anything
    else."""
    match = _TRIGGER_INCLUDE.match(relative)
    return None if match is None else TRIGGERS_DIR / match["file"]
