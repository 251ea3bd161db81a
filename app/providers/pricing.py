"""What a step cost, from its usage and the model config's prices.

Prices live in `chat_model_configs.options` as integer-ish micro-units (1e-6 of the currency)
per million tokens, one per token class; an absent price is 0, so an unpriced model is free
rather than an error:

    {"input_micros_per_mtok": 3000000, "output_micros_per_mtok": 15000000,
     "cache_read_micros_per_mtok": 300000, "cache_write_micros_per_mtok": 3750000}
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from app.providers.base import Usage

PRICE_OPTIONS = (
    "input_micros_per_mtok",
    "output_micros_per_mtok",
    "cache_read_micros_per_mtok",
    "cache_write_micros_per_mtok",
)
TOKENS_PER_MTOK = 1_000_000


def cost_micros(usage: Usage, options: Mapping[str, Any]) -> int:
    """The cost of `usage` in micro-units, rounded half up once per step. Decimal arithmetic,
    so a fractional price (0.3 micros per token) adds up exactly across a long chat."""
    total = (
        usage.input_tokens * price_micros_per_mtok(options, "input_micros_per_mtok")
        + usage.output_tokens * price_micros_per_mtok(options, "output_micros_per_mtok")
        + usage.cache_read_tokens * price_micros_per_mtok(options, "cache_read_micros_per_mtok")
        + usage.cache_write_tokens * price_micros_per_mtok(options, "cache_write_micros_per_mtok")
    )
    return int((total / TOKENS_PER_MTOK).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def price_micros_per_mtok(options: Mapping[str, Any], name: str) -> Decimal:
    """One price from `options`: 0 when absent; ValueError when not a non-negative number
    (the model-config API calls `validate_prices` so a stored config never raises here)."""
    raw = options.get(name)
    if raw is None:
        return Decimal(0)
    price = _decimal(raw)
    if price is None or not price.is_finite() or price < 0:
        raise ValueError(f"{name} must be a non-negative number, got {raw!r}")
    return price


def _decimal(raw: object) -> Decimal | None:
    # bool is an int subclass; `true` as a price is a typo, not 1.
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        return Decimal(str(raw))
    except ArithmeticError:  # decimal.InvalidOperation: not a number at all
        return None


def validate_prices(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first malformed price option, if any."""
    for name in PRICE_OPTIONS:
        price_micros_per_mtok(options, name)
