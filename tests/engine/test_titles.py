from __future__ import annotations

from app.engine.titles import TITLE_MAX_CHARS, clean_title, title_request, wants_generated_title
from app.providers.base import ModelConfig


def test_clean_title_keeps_one_short_line_without_decoration() -> None:
    assert clean_title('"Planning a trip to Lisbon."\nmore text') == "Planning a trip to Lisbon"
    assert clean_title("  # Debugging asyncpg  ") == "Debugging asyncpg"
    long = clean_title("word " * 100)
    assert 0 < len(long) <= TITLE_MAX_CHARS
    assert not long.endswith(" ")


def test_title_request_holds_the_first_exchange() -> None:
    config = ModelConfig(id="m", provider="anthropic", model="claude")
    request = title_request(config, "how do I", "like this")
    assert "User: how do I" in request.messages[0].content[0]["text"]
    assert request.max_output_tokens <= 32
    assert wants_generated_title(config)
    assert not wants_generated_title(ModelConfig(id="e", provider="builtin", model="echo"))
