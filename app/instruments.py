"""The Prometheus instruments that rooms record events into as they happen: turns and steps by
outcome, retries, provider latencies, acquire latency, part flushes (docs/operations.md,
"Metrics"). Part of the foundation: it imports nothing of chatd, so the engine records here
without knowing about HTTP; app/metrics.py exposes them at /metrics with the snapshot gauges.

They live in prometheus_client's process-wide default registry (with its process and GC
collectors): one process is one replica. Label values are bounded sets (outcomes, error kinds,
provider names), never ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Latencies from a millisecond to two minutes (a slow first token, a long step).
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

TURNS = Counter(
    "chatd_turns",
    "Turns ended by this replica's runs, by outcome: waiting (answered; also after a Stop),"
    " failed (a terminal provider error), requeued (shutdown or lost liveness), lost (fenced"
    " out), crashed (an unexpected exception), requires_action (the run ended to wait for the"
    " chat's client; a later run ends the turn).",
    ["outcome"],
)
STEPS = Counter(
    "chatd_steps",
    "Model steps, by outcome: end_turn, tool_use (the model called tools), interrupted (Stop),"
    " failed (a terminal provider error), abandoned (shutdown, lost liveness or ownership).",
    ["outcome"],
)
RETRIES = Counter(
    "chatd_provider_retries",
    "Provider attempts retried, by provider and error kind (rate_limit, overloaded, ...).",
    ["provider", "kind"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "chatd_provider_time_to_first_token_seconds",
    "From the start of a step's provider request to its first streamed delta.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
STEP_DURATION = Histogram(
    "chatd_step_duration_seconds",
    "From the start of a model step to its end (retries included), by provider.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
ACQUIRE_LATENCY = Histogram(
    "chatd_acquire_latency_seconds",
    "From a chat's last change while pending (normally: becoming pending) to its acquire.",
    buckets=_LATENCY_BUCKETS,
)
PART_FLUSH_DURATION = Histogram(
    "chatd_part_flush_duration_seconds",
    "One part flush statement (all runs of the replica, one window).",
    buckets=_LATENCY_BUCKETS,
)
PART_FLUSH_SIZE = Histogram(
    "chatd_part_flush_parts",
    "Live parts written by one flush statement.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
GROUP_COMMIT_WRITES = Histogram(
    "chatd_group_commit_writes",
    "Step writes (persisted steps, ended turns) committed by one group-commit transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 128),
)
