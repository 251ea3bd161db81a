"""An embedded PostgreSQL for `make run` and the test suite, so a new machine needs nothing but
Python. It uses the server binaries shipped in the `pgserver` wheel (which also handles running
the server as an unprivileged user when we are root, as initdb refuses root). The server listens
on a Unix socket only, inside its data directory, and is stopped when the process exits."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.log import get_logger

log = get_logger(__name__)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    dsn: str
    _server: Any

    def stop(self) -> None:
        """Stop the server if this process is its last user (pgserver counts handles)."""
        self._server.cleanup()

    def psql_command(self) -> str:
        return f"{self.bin_dir() / 'psql'} '{self.dsn}'"

    @staticmethod
    def bin_dir() -> Path:
        pgserver = _import_pgserver()
        return Path(pgserver.__file__).parent / "pginstall" / "bin"


def _import_pgserver() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (as on CI); harmless for us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver  # noqa: PLC0415 (imported late, inside the warnings filter)
    return pgserver


def start_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (or attach to an already running) PostgreSQL whose data lives in data_dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pgserver = _import_pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir.resolve(), cleanup_mode="stop")
    dsn = str(server.get_uri())
    log.info("embedded_postgres.started", data_dir=data_dir, dsn=dsn)
    return EmbeddedPostgres(data_dir=data_dir, dsn=dsn, _server=server)
