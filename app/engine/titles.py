"""Chat titles: generated once from the first exchange by the chat's model (short, bounded),
with the first words of the first message as the fallback. The built-in echo model has no
notion of a title, so its chats keep the fallback."""

from __future__ import annotations

from app.providers.base import ModelConfig, ModelRequest, PromptMessage

TITLE_MAX_CHARS = 80
TITLE_MAX_OUTPUT_TOKENS = 32
TITLE_SYSTEM_PROMPT = (
    "Write a title of at most six words for the conversation below. Answer with the title "
    "only: no quotes, no punctuation at the end."
)


def title_request(config: ModelConfig, user_text: str, answer_text: str) -> ModelRequest:
    exchange = f"User: {user_text[:2000]}\n\nAssistant: {answer_text[:2000]}"
    return ModelRequest(
        config=config,
        system=TITLE_SYSTEM_PROMPT,
        messages=[PromptMessage(role="user", content=[{"type": "text", "text": exchange}])],
        max_output_tokens=TITLE_MAX_OUTPUT_TOKENS,
    )


def clean_title(raw: str) -> str:
    """One line, no wrapping quotes or trailing punctuation, at most TITLE_MAX_CHARS."""
    line = next((part.strip() for part in raw.strip().splitlines() if part.strip()), "")
    line = line.strip("\"'`*# ").rstrip(".!:;,")
    if len(line) > TITLE_MAX_CHARS:
        line = line[:TITLE_MAX_CHARS].rsplit(" ", 1)[0].rstrip(".,;:")
    return line


def wants_generated_title(config: ModelConfig) -> bool:
    return config.provider != "builtin"
