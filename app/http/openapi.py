"""The OpenAPI 3.1 document, generated from the route declarations and the very pydantic models
that validate requests (request bodies, query parameters) and describe answers and events."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.http.models import ErrorBody
from app.http.routing import Answer, Route
from app.http.sessions import COOKIE_NAME, CSRF_HEADER, UNSAFE_METHODS

REF = "#/components/schemas/{model}"
# Every route that changes state may refuse a cookie-authenticated request without its CSRF
# token; the document says so where the route's own declaration does not already have a 403.
_CSRF_REFUSED = Answer(
    "authenticated by the session cookie without the right CSRF token (or from another origin)",
    ErrorBody,
)
_PATH_PARAM = re.compile(r"\{(\w+)\}")
_PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "uuid": {"type": "string", "format": "uuid"},
    "id": {"type": "integer", "format": "int64", "minimum": 1},
}


def _mark_integers(node: Any) -> None:
    """JSON Schema's `integer` also matches 10.0; the server takes only 10 (pydantic's strict
    ints in bodies, digits in queries), so every integer of the document says so."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["x-digits-only"] = True
        for value in node.values():
            _mark_integers(value)
    elif isinstance(node, list):
        for value in node:
            _mark_integers(value)


def openapi_document(routes: list[Route], *, version: str = "0.1.0") -> dict[str, Any]:  # noqa: PLR0912  one branch per optional OpenAPI field
    models: list[type[BaseModel]] = [ErrorBody]
    for route in routes:
        answer_models = [model for answer in route.answers.values() for model in answer.models]
        for model in (route.body, route.query, *answer_models):
            if model is not None and model not in models:
                models.append(model)
    refs, top = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    schemas: dict[str, Any] = top.get("$defs", {})

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return dict(refs[(model, "validation")])

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": [route.tag],
            "responses": {},
        }
        if route.description:
            operation["description"] = route.description
        # A route that needs a user takes a bearer token or the browser session cookie.
        operation["security"] = [{"bearer": []}, {"session": []}] if route.auth else []
        if route.admin:
            operation["x-admin-only"] = True
        parameters: list[dict[str, Any]] = []
        for name in _PATH_PARAM.findall(route.path):
            kind = route.path_params.get(name, "uuid")
            parameters.append(
                {"name": name, "in": "path", "required": True, "schema": _PATH_SCHEMAS[kind]}
            )
        if route.query is not None:
            query_schema = schemas[route.query.__name__]
            required = set(query_schema.get("required", []))
            for name, schema in query_schema.get("properties", {}).items():
                parameter: dict[str, Any] = {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "schema": {k: v for k, v in schema.items() if k != "description"},
                }
                if "description" in schema:
                    parameter["description"] = schema["description"]
                parameters.append(parameter)
        for name, description in route.headers.items():
            parameters.append(
                {
                    "name": name,
                    "in": "header",
                    "required": False,
                    "description": description,
                    "schema": {"type": "string"},
                }
            )
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(route.body)}},
            }
        answers = dict(route.answers)
        if route.auth and route.method in UNSAFE_METHODS and 403 not in answers:
            answers[403] = _CSRF_REFUSED
        for status, answer in sorted(answers.items()):
            response: dict[str, Any] = {"description": answer.description}
            if answer.alternatives:
                schema = {"oneOf": [ref(model) for model in answer.models]}
                response["content"] = {answer.media_type: {"schema": schema}}
            elif answer.model is not None:
                response["content"] = {answer.media_type: {"schema": ref(answer.model)}}
            operation["responses"][str(status)] = response
        paths.setdefault(route.path, {})[route.method.lower()] = operation

    _mark_integers(paths)
    _mark_integers(schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatd",
            "version": version,
            "description": "Durable AI-agent chats. Errors are JSON {message, detail?,"
            " validations?}. Streams: see docs/api.md for the event protocol and cursors."
            " Integers (marked x-digits-only) are written in digits, in bodies and queries:"
            " 10, never 10.0 or 1e1 (a 400), although JSON Schema alone would take 10.0.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": COOKIE_NAME,
                    "description": f"A browser session (docs/web.md). Requests that change"
                    f" state also send the session's CSRF token in {CSRF_HEADER}.",
                },
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }
