"""Which provider serves a model config."""

from __future__ import annotations

from app.providers.base import ClassifiedError, ModelConfig, Provider, ProviderError
from app.providers.builtin import EchoProvider


def provider_for(config: ModelConfig) -> Provider:
    if config.provider == "builtin":
        return EchoProvider()
    raise ProviderError(
        ClassifiedError(
            kind="config",
            provider=config.provider,
            retryable=False,
            message=f"provider {config.provider!r} is not available",
        )
    )
