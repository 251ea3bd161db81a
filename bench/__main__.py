"""`make bench`: every scenario, several runs each, one table of medians and spreads, ratios
against the physical limits and the peer measured in the same run, and a JSON file under
bench/results/.

    python -m bench                       # everything, 3 runs each
    python -m bench --runs 5 physical peer
    python -m bench --large fanout        # the issue's scale: 1,000 streaming chats
    python -m bench --baseline DIR throughput peer
                                          # before/after: every scenario that starts replicas
                                          # also runs them from source tree DIR (e.g.
                                          # `git archive <commit> | tar -x -C DIR`), interleaved
                                          # run by run, reported as `<scenario>@baseline`
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import chatd_engine, fanout, peer_pgqueuer, physical, roundtrips
from bench.harness import BenchServer, ScenarioResult


@dataclass(frozen=True)
class Options:
    large: bool = False


Scenario = Callable[[BenchServer, ScenarioResult, Options], Awaitable[None]]


async def _physical(server: BenchServer, result: ScenarioResult, _options: Options) -> None:
    async with server.fresh_database(migrated=False) as dsn:
        await physical.notify_latency(dsn, result)
        await physical.commit_rates(dsn, result)


async def _peer(server: BenchServer, result: ScenarioResult, _options: Options) -> None:
    async with server.fresh_database(migrated=False) as dsn:
        await peer_pgqueuer.run(dsn, result)


async def _pickup(server: BenchServer, result: ScenarioResult, _options: Options) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.pickup(dsn, result, listen=True)
    async with server.fresh_database() as dsn:
        await chatd_engine.pickup(dsn, result, listen=False)


async def _throughput(server: BenchServer, result: ScenarioResult, _options: Options) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.throughput(dsn, result)


async def _roundtrips(server: BenchServer, result: ScenarioResult, _options: Options) -> None:
    async with server.fresh_database() as dsn:
        await roundtrips.run(dsn, result)


async def _fanout(server: BenchServer, result: ScenarioResult, options: Options) -> None:
    scale = fanout.LARGE_SCALE if options.large else fanout.DEFAULT_SCALE
    async with server.fresh_database() as dsn:
        await fanout.run(dsn, result, scale)


async def _interrupt(server: BenchServer, result: ScenarioResult, _options: Options) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.interrupt(dsn, result)


async def _failover(server: BenchServer, result: ScenarioResult, _options: Options) -> None:
    async with server.fresh_database() as dsn:
        await chatd_engine.failover(dsn, result)


SCENARIOS: dict[str, Scenario] = {
    "physical": _physical,
    "peer": _peer,
    "pickup": _pickup,
    "throughput": _throughput,
    "roundtrips": _roundtrips,
    "fanout": _fanout,
    "interrupt": _interrupt,
    "failover": _failover,
}
# Scenarios that run real replica processes (and so can run a baseline tree's code too).
WITH_REPLICAS = frozenset({"pickup", "throughput", "fanout", "interrupt", "failover"})

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

# Reference scenarios that run interleaved with the scenario they are the reference of when
# both are selected (scenario -> reference): PGQueuer's jobs/s is the reference of turns/s, and
# this machine's speed drifts from one minute to the next.
INTERLEAVED = {"throughput": "peer"}

# The targets on this machine (issue 6, tightened or added by issue 14): (label, scenario,
# metric, bound, reference). The bound is "<= value" or ">= value"; with a reference (scenario,
# metric, factor), the value is the factor times that median of the same run.
Reference = tuple[str, str, float]
TARGETS: list[tuple[str, str, str, str, float | Reference]] = [
    ("pickup p50 <= 1.5 ms", "pickup", "pickup_p50_ms", "<=", 1.5),
    ("pickup p99 <= PGQueuer p99", "pickup", "pickup_p99_ms", "<=", ("peer", "pickup_p99_ms", 1)),
    (
        "turns/s >= 1/2 PGQueuer jobs/s",
        "throughput",
        "turns_per_s",
        ">=",
        ("peer", "jobs_per_s", 0.5),
    ),
    (
        "pool statements per turn in a burst <= 4",
        "roundtrips",
        "burst_pool_statements_per_turn",
        "<=",
        4.0,
    ),
    ("token latency p50 <= 30 ms (200 x 3)", "fanout", "token_latency_p50_ms", "<=", 30.0),
    ("token latency p99 <= 100 ms (200 x 3)", "fanout", "token_latency_p99_ms", "<=", 100.0),
    (
        "streamer CPU per delivered token <= 25 us",
        "fanout",
        "streamer_cpu_us_per_delivered_token",
        "<=",
        25.0,
    ),
    ("worker CPU per streamed token <= 40 us", "fanout", "worker_cpu_us_per_token", "<=", 40.0),
    (
        "flush commits per window per replica <= 1.5",
        "fanout",
        "worker_flushes_per_window",
        "<=",
        1.5,
    ),
    ("failover p99 <= 1.5 s", "failover", "failover_p99_ms", "<=", 1500.0),
    ("interrupt p99 <= 200 ms", "interrupt", "interrupt_p99_ms", "<=", 200.0),
]

# "No worse than before" (issue 14), checked when the run has a `--baseline`: the median of
# the current tree over the baseline's, interleaved in the same run, within NOISE_FACTOR (this
# machine's medians move by about that much between neighbouring runs of the same code).
NOISE_FACTOR = 1.10
NO_WORSE: list[tuple[str, str]] = [
    ("pickup", "pickup_p50_ms"),
    ("pickup", "pickup_p99_ms"),
    ("failover", "failover_p50_ms"),
    ("failover", "failover_p99_ms"),
    ("interrupt", "interrupt_p50_ms"),
    ("interrupt", "interrupt_p99_ms"),
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
    print(f"\n{'scenario':<20} {'metric':<46} {'median':>11} {'min':>11} {'max':>11}  n")
    for result in results:
        for metric in result.metrics.values():
            low, high = metric.spread
            print(
                f"{result.scenario:<20} {metric.name + ' [' + metric.unit + ']':<46}"
                f" {metric.median:>11.3f} {low:>11.3f} {high:>11.3f}  {len(metric.samples)}"
            )
        for note in result.notes:
            print(f"{'':<20} note: {note}")


def _median(by_name: dict[str, ScenarioResult], scenario: str, metric: str) -> float | None:
    result = by_name.get(scenario)
    if result is None or metric not in result.metrics:
        return None
    return result.median(metric)


def _ratios(results: list[ScenarioResult]) -> dict[str, float]:
    by_name = {r.scenario: r for r in results}
    ratios: dict[str, float] = {}
    for label, (num_scenario, num_metric), (den_scenario, den_metric) in RATIOS:
        num = _median(by_name, num_scenario, num_metric)
        den = _median(by_name, den_scenario, den_metric)
        if num is not None and den is not None:
            ratios[label] = num / den
    # Before/after: every metric of a scenario against its baseline run.
    for result in results:
        base = by_name.get(f"{result.scenario}@baseline")
        if base is None:
            continue
        for name in result.metrics:
            den = _median(by_name, base.scenario, name)
            if den:
                ratios[f"{result.scenario} {name}: now / baseline"] = result.median(name) / den
    return ratios


def _targets(results: list[ScenarioResult]) -> list[tuple[str, float, float, bool]]:
    """(label, measured, bound, met) of every target whose numbers were measured."""
    by_name = {r.scenario: r for r in results}
    checked = []
    for label, scenario, metric, relation, bound in TARGETS:
        measured = _median(by_name, scenario, metric)
        if isinstance(bound, tuple):
            reference = _median(by_name, bound[0], bound[1])
            limit = None if reference is None else reference * bound[2]
        else:
            limit = bound
        if measured is None or limit is None:
            continue
        met = measured <= limit if relation == "<=" else measured >= limit
        checked.append((label, measured, limit, met))
    for scenario, metric in NO_WORSE:
        now = _median(by_name, scenario, metric)
        before = _median(by_name, f"{scenario}@baseline", metric)
        if now is None or not before:
            continue
        label = f"{scenario} {metric} now / baseline <= {NOISE_FACTOR:.2f}"
        checked.append((label, now / before, NOISE_FACTOR, now / before <= NOISE_FACTOR))
    return checked


async def _run_scenarios(
    server: BenchServer, names: list[str], runs: int, options: Options, baseline: Path | None
) -> list[ScenarioResult]:
    """Each scenario `runs` times; with a baseline tree, the replica scenarios also with it,
    interleaved run by run."""
    results: list[ScenarioResult] = []
    # A reference scenario selected with the scenario it is the reference of runs
    # interleaved with it, run by run: the ratio then compares neighbouring minutes.
    companions = {
        name: companion
        for name, companion in INTERLEAVED.items()
        if name in names and companion in names
    }
    for name in names:
        if name in companions.values():
            continue
        variants: list[tuple[ScenarioResult, Path | None]] = [(ScenarioResult(name), None)]
        if name in companions:
            variants.insert(0, (ScenarioResult(companions[name]), None))
        if baseline is not None and name in WITH_REPLICAS:
            variants.append((ScenarioResult(f"{name}@baseline"), baseline))
        for run in range(runs):
            for result, tree in variants:
                chatd_engine.SOURCE_TREE = tree
                began = time.perf_counter()
                try:
                    scenario = result.scenario.removesuffix("@baseline")
                    await SCENARIOS[scenario](server, result, options)
                finally:
                    chatd_engine.SOURCE_TREE = None
                print(
                    f"bench: {result.scenario} run {run + 1}/{runs}"
                    f" {time.perf_counter() - began:.1f}s"
                )
        results.extend(result for result, _tree in variants)
    return results


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    # No `choices=`: argparse would check the empty default against them and refuse it.
    parser.add_argument("scenarios", nargs="*", metavar="scenario", help=", ".join(SCENARIOS))
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument(
        "--large", action="store_true", help="fanout at 1,000 streaming chats (default 200)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the replica scenarios with the code of source tree DIR, interleaved",
    )
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    options = Options(large=args.large)
    baseline: Path | None = args.baseline.resolve() if args.baseline else None
    if baseline is not None and not (baseline / "app" / "cli.py").is_file():
        parser.error(f"{baseline} is not a chatd source tree")

    server = BenchServer.start()
    try:
        version = await server.server_version()
        print(f"bench: PostgreSQL {version} ({server.description}), {args.runs} run(s) each")
        results = await _run_scenarios(server, names, args.runs, options, baseline)
    finally:
        server.stop()

    _print_table(results)
    ratios = _ratios(results)
    if ratios:
        print("\nratios (medians of this run)")
        for label, value in ratios.items():
            print(f"  {label:<66} {value:8.3f}")
    targets = _targets(results)
    if targets:
        print("\ntargets (medians of this run)")
        for label, measured, limit, met in targets:
            verdict = "met" if met else "MISSED"
            print(f"  {label:<62} {measured:11.3f} vs {limit:11.3f}  {verdict}")

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
                "targets": {
                    label: {"measured": measured, "bound": limit, "met": met}
                    for label, measured, limit, met in targets
                },
            },
            indent=2,
        )
    )
    print(f"\nbench: wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
