"""The admin routes' handlers: model configs (secrets never shown back) and the replica list.
They translate HTTP to calls of app/state/admin.py; the middleware picks error statuses."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.errors import ValidationFailed
from app.http.models import CreateModelConfigRequest, UpdateModelConfigRequest
from app.http.routing import Call, json_response
from app.providers.pricing import validate_prices
from app.state import admin

_NUMERIC_OPTIONS = {
    "token_delay_ms": (0.0, 60_000.0),
    "startup_timeout_s": (0.0, 86_400.0),
    "silence_timeout_s": (0.0, 86_400.0),
}


def _check_options(options: dict[str, Any] | None) -> None:
    if options is None:
        return
    try:
        validate_prices(options)
    except ValueError as exc:
        raise ValidationFailed(
            "invalid price option", validations=[{"field": "options", "detail": str(exc)[:200]}]
        ) from None
    for name, (low, high) in _NUMERIC_OPTIONS.items():
        value = options.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ValidationFailed(
                f"options.{name} must be a number between {low:g} and {high:g}",
                validations=[{"field": f"options.{name}", "detail": "out of range"}],
            )


async def list_model_configs(call: Call) -> web.StreamResponse:
    configs = await admin.list_model_configs(call.pool, include_disabled=call.me.is_admin)
    return json_response({"model_configs": [config.to_json() for config in configs]})


async def create_model_config(call: Call) -> web.StreamResponse:
    body = await call.body(CreateModelConfigRequest)
    _check_options(body.options)
    config = await admin.create_model_config(
        call.pool,
        provider=body.provider,
        model=body.model,
        display_name=body.display_name,
        context_limit=body.context_limit,
        compression_threshold=body.compression_threshold,
        is_default=body.is_default,
        enabled=body.enabled,
        options=body.options,
    )
    return json_response(config.to_json(), status=201)


async def update_model_config(call: Call) -> web.StreamResponse:
    config_id = call.path_uuid("id")
    body = await call.body(UpdateModelConfigRequest)
    _check_options(body.options)
    config = await admin.update_model_config(
        call.pool,
        config_id,
        admin.ModelConfigChanges(
            provider=body.provider,
            model=body.model,
            display_name=body.display_name,
            context_limit=body.context_limit,
            compression_threshold=body.compression_threshold,
            is_default=body.is_default,
            enabled=body.enabled,
            options=body.options,
        ),
    )
    return json_response(config.to_json())


async def delete_model_config(call: Call) -> web.StreamResponse:
    await admin.delete_model_config(call.pool, call.path_uuid("id"))
    return web.Response(status=204)


async def list_replicas(call: Call) -> web.StreamResponse:
    return json_response({"replicas": await admin.list_replicas(call.pool)})
