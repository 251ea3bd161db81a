"""What every scenario shares: a PostgreSQL to run against (embedded, or DATABASE_URL), a fresh
database per scenario run, and the statistics we report (medians and spreads, never a single
number: these machines are noisy)."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from app.db.connections import dsn_with_database
from app.db.embedded import EmbeddedPostgres, start_embedded_postgres
from app.db.migrate import migrate


@dataclass
class BenchServer:
    admin_dsn: str
    embedded: EmbeddedPostgres | None
    description: str

    @classmethod
    def start(cls) -> BenchServer:
        url = os.environ.get("DATABASE_URL", "")
        if url:
            return cls(admin_dsn=url, embedded=None, description="DATABASE_URL")
        data_dir = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
        embedded = start_embedded_postgres(data_dir)
        return cls(admin_dsn=embedded.dsn, embedded=embedded, description="embedded")

    async def server_version(self) -> str:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    @asynccontextmanager
    async def fresh_database(self, *, migrated: bool = True) -> AsyncIterator[str]:
        name = f"chatd_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            # The previous run's dirty pages are written now rather than by a checkpoint in the
            # middle of this run's measurement.
            await admin.execute("CHECKPOINT")
            await admin.execute(f'CREATE DATABASE "{name}"')
            dsn = dsn_with_database(self.admin_dsn, name)
            if migrated:
                conn = await asyncpg.connect(dsn)
                try:
                    await migrate(conn)
                finally:
                    await conn.close()
            yield dsn
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            shutil.rmtree(self.embedded.data_dir, ignore_errors=True)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p50, p99); exact for the sample, no interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Metric:
    """One number a scenario reports, collected over repeated runs."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    better: str = "lower"  # or "higher"

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.samples), max(self.samples)) if self.samples else (float("nan"),) * 2


@dataclass
class ScenarioResult:
    scenario: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str, better: str = "lower") -> None:
        metric = self.metrics.setdefault(name, Metric(name, unit, better=better))
        metric.samples.append(value)

    def median(self, name: str) -> float:
        return self.metrics[name].median
