"""Which provider serves a model config, and where its key comes from (registry.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from app.providers.anthropic import AnthropicProvider
from app.providers.base import ModelConfig, ProviderError
from app.providers.catalog import close_providers, provider_for
from app.providers.offline import EchoProvider
from app.providers.openai import OpenAIProvider


@pytest.fixture(autouse=True)
async def _close_cached_clients() -> AsyncIterator[None]:
    yield
    await close_providers()


def config(provider: str, **options: str) -> ModelConfig:
    return ModelConfig(id="m", provider=provider, model="some-model", options=dict(options))


def test_builtin_needs_no_key() -> None:
    assert isinstance(provider_for(config("builtin"), env={}), EchoProvider)


@pytest.mark.parametrize(
    ("provider", "env_key", "adapter"),
    [
        ("anthropic", "ANTHROPIC_API_KEY", AnthropicProvider),
        ("openai", "OPENAI_API_KEY", OpenAIProvider),
    ],
)
def test_sdk_providers_take_their_key_from_the_environment(
    provider: str, env_key: str, adapter: type[object]
) -> None:
    assert isinstance(provider_for(config(provider), env={env_key: "sk-env"}), adapter)


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_missing_key_is_a_non_retryable_config_error(provider: str) -> None:
    with pytest.raises(ProviderError) as raised:
        provider_for(config(provider), env={})
    error = raised.value.error
    assert (error.kind, error.retryable, error.provider) == ("config", False, provider)
    assert f"{provider.upper()}_API_KEY" in error.message


def test_unknown_provider_is_a_config_error() -> None:
    with pytest.raises(ProviderError) as raised:
        provider_for(config("mystery"), env={})
    assert (raised.value.error.kind, raised.value.error.retryable) == ("config", False)


def test_adapters_and_their_clients_are_shared_per_key_and_base_url() -> None:
    env = {"OPENAI_API_KEY": "sk-env"}
    first = provider_for(config("openai"), env=env)
    assert provider_for(config("openai"), env=env) is first
    assert provider_for(config("openai", api_key="sk-other"), env=env) is not first
    assert provider_for(config("openai", base_url="http://127.0.0.1:1/v1"), env=env) is not first
