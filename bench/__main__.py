"""`make bench`: every scenario, several runs each, one table of medians and spreads, ratios
against the physical limits and the peer measured in the same run, and a JSON file under
bench/results/.

    python -m bench                       # everything, 3 runs each
    python -m bench --runs 5 physical peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import chatd_engine, peer_pgqueuer, physical
from bench.harness import BenchServer, ScenarioResult

Scenario = Callable[[BenchServer, ScenarioResult], Awaitable[None]]


async def _physical(server: BenchServer, result: ScenarioResult) -> None:
    async with server.fresh_database(migrated=False) as dsn:
        await physical.notify_latency(dsn, result)
        await physical.commit_rates(dsn, result)


async def _peer(server: BenchServer, result: ScenarioResult) -> None:
    async with server.fresh_database(migrated=False) as dsn:
        await peer_pgqueuer.run(dsn, result)


async def _pickup(server: BenchServer, result: ScenarioResult) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.pickup(dsn, result, listen=True)
    async with server.fresh_database() as dsn:
        await chatd_engine.pickup(dsn, result, listen=False)


async def _throughput(server: BenchServer, result: ScenarioResult) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.throughput(dsn, result)


async def _interrupt(server: BenchServer, result: ScenarioResult) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.interrupt(dsn, result)


async def _failover(server: BenchServer, result: ScenarioResult) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.failover(dsn, result)


SCENARIOS: dict[str, Scenario] = {
    "physical": _physical,
    "peer": _peer,
    "pickup": _pickup,
    "throughput": _throughput,
    "interrupt": _interrupt,
    "failover": _failover,
}

# (label, numerator, denominator): ratios printed under the table when both sides were run.
RATIOS: list[tuple[str, tuple[str, str], tuple[str, str]]] = [
    (
        "chatd pickup p50 / PGQueuer pickup p50",
        ("pickup", "pickup_p50_ms"),
        ("peer", "pickup_p50_ms"),
    ),
    (
        "chatd pickup p99 / PGQueuer pickup p99",
        ("pickup", "pickup_p99_ms"),
        ("peer", "pickup_p99_ms"),
    ),
    (
        "chatd pickup p50 / poll-only pickup p50",
        ("pickup", "pickup_p50_ms"),
        ("pickup", "pickup_poll_only_p50_ms"),
    ),
    (
        "chatd pickup p50 / NOTIFY latency p50 (physical floor)",
        ("pickup", "pickup_p50_ms"),
        ("physical", "notify_latency_p50_ms"),
    ),
    (
        "chatd turns/s / PGQueuer no-op jobs/s",
        ("throughput", "turns_per_s"),
        ("peer", "jobs_per_s"),
    ),
]


def _machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version()}


def _print_table(results: list[ScenarioResult]) -> None:
    print(f"\n{'scenario':<12} {'metric':<34} {'median':>12} {'min':>12} {'max':>12}  n")
    for result in results:
        for metric in result.metrics.values():
            low, high = metric.spread
            print(
                f"{result.scenario:<12} {metric.name + ' [' + metric.unit + ']':<34}"
                f" {metric.median:>12.3f} {low:>12.3f} {high:>12.3f}  {len(metric.samples)}"
            )
        for note in result.notes:
            print(f"{'':<12} note: {note}")


def _ratios(results: list[ScenarioResult]) -> dict[str, float]:
    by_name = {r.scenario: r for r in results}
    ratios: dict[str, float] = {}
    for label, (num_scenario, num_metric), (den_scenario, den_metric) in RATIOS:
        num, den = by_name.get(num_scenario), by_name.get(den_scenario)
        if num is None or den is None:
            continue
        if num_metric not in num.metrics or den_metric not in den.metrics:
            continue
        ratios[label] = num.median(num_metric) / den.median(den_metric)
    return ratios


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenarios", nargs="*", choices=list(SCENARIOS), default=[])
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)

    server = BenchServer.start()
    try:
        version = await server.server_version()
        print(f"bench: PostgreSQL {version} ({server.description}), {args.runs} run(s) each")
        results: list[ScenarioResult] = []
        for name in names:
            result = ScenarioResult(name)
            for run in range(args.runs):
                began = time.perf_counter()
                await SCENARIOS[name](server, result)
                print(f"bench: {name} run {run + 1}/{args.runs} {time.perf_counter() - began:.1f}s")
            results.append(result)
    finally:
        server.stop()

    _print_table(results)
    ratios = _ratios(results)
    if ratios:
        print("\nratios (medians of this run)")
        for label, value in ratios.items():
            print(f"  {label:<60} {value:8.3f}")

    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = out_dir / f"bench-{stamp}.json"
    out_path.write_text(
        json.dumps(
            {
                "taken_at": stamp,
                "machine": _machine(),
                "postgres": version,
                "runs": args.runs,
                "results": {
                    r.scenario: {
                        m.name: {"unit": m.unit, "median": m.median, "samples": m.samples}
                        for m in r.metrics.values()
                    }
                    for r in results
                },
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"\nbench: wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
