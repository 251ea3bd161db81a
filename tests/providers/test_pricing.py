"""Step cost from usage and per-model prices (app/providers/pricing.py)."""

from __future__ import annotations

from typing import Any

import pytest

from app.providers.base import Usage
from app.providers.pricing import cost_micros, validate_prices

# Prices of a typical frontier model, in micros per million tokens ($3 / $15 / $0.30 / $3.75).
PRICES = {
    "input_micros_per_mtok": 3_000_000,
    "output_micros_per_mtok": 15_000_000,
    "cache_read_micros_per_mtok": 300_000,
    "cache_write_micros_per_mtok": 3_750_000,
}


def test_every_token_class_has_its_own_price() -> None:
    usage = Usage(
        input_tokens=1_000, output_tokens=500, cache_read_tokens=10_000, cache_write_tokens=2_000
    )
    # 3000 + 7500 + 3000 + 7500 micros
    assert cost_micros(usage, PRICES) == 21_000


def test_absent_prices_cost_nothing() -> None:
    assert cost_micros(Usage(1_000_000, 1_000_000, 1_000_000, 1_000_000), {}) == 0
    assert cost_micros(Usage(1_000_000), {"output_micros_per_mtok": 5}) == 0


def test_rounds_half_up_once_per_step() -> None:
    # 1 token at 1.5 micros per token: 1.5 micros, rounded to 2; 1 token at 0.4 → 0.
    assert cost_micros(Usage(input_tokens=1), {"input_micros_per_mtok": 1_500_000}) == 2
    assert cost_micros(Usage(input_tokens=1), {"input_micros_per_mtok": 400_000}) == 0


def test_fractional_and_string_prices_are_exact() -> None:
    options = {"input_micros_per_mtok": "0.1", "output_micros_per_mtok": 0.2}
    assert cost_micros(Usage(input_tokens=10_000_000, output_tokens=10_000_000), options) == 3


@pytest.mark.parametrize("bad", [-1, "cheap", True, float("inf"), [1], {"usd": 1}])
def test_malformed_prices_are_rejected(bad: Any) -> None:
    options = {"output_micros_per_mtok": bad}
    with pytest.raises(ValueError, match="output_micros_per_mtok"):
        validate_prices(options)
    with pytest.raises(ValueError, match="output_micros_per_mtok"):
        cost_micros(Usage(output_tokens=1), options)


def test_valid_prices_validate() -> None:
    validate_prices(PRICES)
    validate_prices({})
