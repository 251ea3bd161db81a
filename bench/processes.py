"""CPU and memory of local processes, from /proc: the replicas the bench started and the
PostgreSQL server (the postmaster and its children)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg


@dataclass(frozen=True)
class ProcessSample:
    cpu_s: float
    rss_kb: int


def sample_process(pid: int) -> ProcessSample:
    """utime + stime and VmRSS of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return ProcessSample(cpu_s=ticks / _CLOCK_TICKS, rss_kb=rss_kb)


_CLOCK_TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


def _cpu_s(pid: int) -> float:
    try:
        return sample_process(pid).cpu_s
    except (OSError, IndexError, ValueError):
        return 0.0  # gone meanwhile


def postgres_cpu_s(postmaster_pid: int | None) -> dict[int, float]:
    """CPU seconds of the postmaster and each of its children (backends, background workers),
    by pid; empty when the server is not a local process we can see."""
    if postmaster_pid is None:
        return {}
    try:
        children = Path(f"/proc/{postmaster_pid}/task/{postmaster_pid}/children").read_text()
    except OSError:
        return {}
    pids = [postmaster_pid, *(int(pid) for pid in children.split())]
    return {pid: _cpu_s(pid) for pid in pids}


async def postmaster_pid(pool: asyncpg.Pool | asyncpg.Connection) -> int | None:
    """The local postmaster: the parent of one of our backends."""
    return parent_pid(await pool.fetchval("SELECT pg_backend_pid()"))


def parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
