"""Which provider serves a model config, and the SDK clients they share.

An SDK client owns a connection pool, so adapters are cached per (provider, API key, base URL)
and reused by every chat of every model config that resolves to the same credentials. The
cache is bounded in practice by the number of distinct credentials in `chat_model_configs`.
Call `close_providers()` when the replica stops, so pooled connections close cleanly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from app.providers.anthropic import AnthropicProvider
from app.providers.base import ClassifiedError, ModelConfig, Provider, ProviderError
from app.providers.offline import EchoProvider, ScriptProvider
from app.providers.openai import OpenAIProvider

_ENV_PREFIX = {"anthropic": "ANTHROPIC", "openai": "OPENAI"}

_cache: dict[tuple[str, str, str | None], AnthropicProvider | OpenAIProvider] = {}


def provider_for(config: ModelConfig, *, env: Mapping[str, str] | None = None) -> Provider:
    """The provider for `config`. Raises a non-retryable `config` ProviderError when the config
    cannot be served: an unknown provider, or no API key.

    Key and base URL come from `config.options` (`api_key`, `base_url`) or else from the
    environment (`ANTHROPIC_API_KEY`/`ANTHROPIC_BASE_URL`, `OPENAI_API_KEY`/`OPENAI_BASE_URL`)."""
    if config.provider == "builtin":
        return ScriptProvider() if config.model == "script" else EchoProvider()
    prefix = _ENV_PREFIX.get(config.provider)
    if prefix is None:
        raise _config_error(config.provider, f"provider {config.provider!r} is not available")
    environ = os.environ if env is None else env
    api_key = _option(config, "api_key") or environ.get(f"{prefix}_API_KEY", "")
    base_url = _option(config, "base_url") or environ.get(f"{prefix}_BASE_URL") or None
    if not api_key:
        raise _config_error(
            config.provider,
            f"no API key for {config.provider}: set {prefix}_API_KEY or the model config's "
            "options.api_key",
        )
    key = (config.provider, api_key, base_url)
    cached = _cache.get(key)
    if cached is None:
        if config.provider == "anthropic":
            cached = AnthropicProvider(api_key=api_key, base_url=base_url)
        else:
            cached = OpenAIProvider(api_key=api_key, base_url=base_url)
        _cache[key] = cached
    return cached


async def close_providers() -> None:
    """Close every cached SDK client (replica shutdown, test teardown)."""
    providers = list(_cache.values())
    _cache.clear()
    for provider in providers:
        await provider.aclose()


def _option(config: ModelConfig, name: str) -> str:
    value = config.options.get(name)
    return value if isinstance(value, str) else ""


def _config_error(provider: str, message: str) -> ProviderError:
    return ProviderError(
        ClassifiedError(kind="config", provider=provider, retryable=False, message=message)
    )
