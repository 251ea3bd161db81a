"""A schema-driven fuzz of every route: requests are generated from the served OpenAPI document
(valid values from each schema, then mutated: wrong types, missing and unknown fields, extreme
numbers and sizes, NUL and lone surrogates, deep nesting, garbage ids and cursors) and sent as
an admin and as a plain user, against chats, messages and queue entries that exist. No request
may produce a 5xx, and every error is a JSON `{message, ...}`.

Deterministic: the seed is fixed (CHATD_FUZZ_SEED overrides it) and so is the number of cases
per route (CHATD_FUZZ_CASES). No extra dependency: the generator is below."""

from __future__ import annotations

import json
import os
import random
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from pydantic import ValidationError

from app.http import models as http_models
from app.http.keys import OPENAPI
from tests import factories
from tests.http_harness import ApiInstance, SimulatedWorker, api_instance

SEED = int(os.environ.get("CHATD_FUZZ_SEED", "20260421"))
CASES_PER_ROUTE = int(os.environ.get("CHATD_FUZZ_CASES", "60"))
MAX_REQUEST_LINE = 8000  # aiohttp's parser answers 400 (text) to longer request lines

EVIL_VALUES: list[Any] = [
    None,
    "",
    " ",
    "\x00",
    "\ud800",
    "x" * 300,
    "x" * 200_001,
    0,
    -1,
    2**31,
    2**63,
    -(2**64),
    1.5,
    1e308,
    True,
    False,
    [],
    {},
    [None],
    {"type": "text"},
    {"nested": {"deeper": [[[[[[1]]]]]]}},
    "00000000-0000-0000-0000-000000000000",
    "not-a-uuid",
    "1:2",
    "9" * 40,
]
ANY_JSON_VALUES: list[Any] = [None, "", "text", 0, -1.5, True, [], {}, [1, "two"], {"k": [None]}]
EVIL_PATH_SEGMENTS = [
    "x",
    "0",
    "-1",
    "1.5",
    "99999999999999999999",
    "%00",
    "%ff%fe",
    "00000000-0000-0000-0000-00000000000",
    "00000000000000000000000000000000",
    "{id}",
    "%2e%2e",
    "🙂",
]


class Generator:
    def __init__(self, document: dict[str, Any], rng: random.Random) -> None:
        self.schemas: dict[str, Any] = document["components"]["schemas"]
        self.rng = rng

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self.schemas[schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def valid(self, schema: dict[str, Any], depth: int = 0) -> Any:  # noqa: PLR0911, PLR0912  one branch per JSON-schema form
        schema = self.resolve(schema)
        rng = self.rng
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.valid(rng.choice(schema[key]), depth)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return rng.choice(schema["enum"])
        kind = schema.get("type")
        if kind == "null":
            return None
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "integer":
            low = schema.get("minimum", 0)
            high = min(schema.get("maximum", low + 1000), low + 1000)
            number = rng.randint(low, high)
            if not schema.get("x-digits-only") and rng.random() < 0.3:
                return float(number)  # JSON Schema's `integer` matches 10.0 too
            return number
        if kind == "number":
            return rng.uniform(0, 100)
        if kind == "string":
            if schema.get("format") == "uuid":
                return str(uuid.uuid4())
            if "pattern" in schema:
                return self.matching(schema["pattern"])
            return self.text(schema)
        if kind == "array":
            items = schema.get("items", {})
            count = rng.randint(schema.get("minItems", 0), min(schema.get("maxItems", 3), 3))
            unique_by = schema.get("x-unique-by")  # items' property that must not repeat
            for _attempt in range(100):
                array = [self.valid(items, depth + 1) for _ in range(count)]
                if "contains" in schema and not any(
                    _satisfies(schema["contains"], item) for item in array
                ):
                    continue
                if unique_by is not None:
                    keys = [item.get(unique_by) for item in array]
                    if len(set(keys)) != len(keys):
                        continue
                return array
            raise AssertionError(f"cannot generate an array for {schema}")
        if kind == "object" or "properties" in schema:
            value = {}
            required = set(schema.get("required", []))
            for name, prop in schema.get("properties", {}).items():
                if name in required or rng.random() < 0.5:
                    value[name] = self.valid(prop, depth + 1)
            return value
        # No type: any JSON value (a client tool's result). Strings follow the rule every string
        # of a request follows (no NUL, no lone surrogate; docs/api.md, "Errors").
        return rng.choice(ANY_JSON_VALUES)

    def text(self, schema: dict[str, Any]) -> str:
        low = schema.get("minLength", 0)
        high = min(schema.get("maxLength", 30), 30)
        count = self.rng.randint(max(low, 1), max(high, low, 1))
        return "".join(self.rng.choice("abc xyz") for _ in range(count))

    def matching(self, pattern: str) -> str:
        """A string the pattern accepts, from a few shapes the document's patterns have."""
        rng = self.rng
        shapes = [
            lambda: self.text({}),
            lambda: f"{rng.randint(0, 50)}:{rng.randint(0, 50)}",
            lambda: f"{rng.randint(0, 10**16)}:{uuid.uuid4()}",
            lambda: rng.choice("abc") + rng.choice(["", "_x", "1"]) + str(rng.randint(0, 99)),
            lambda: f"http://127.0.0.1:{rng.randint(1, 65535)}/mcp",
        ]
        for _attempt in range(100):
            candidate = rng.choice(shapes)()
            if re.search(pattern, candidate):
                return candidate
        raise AssertionError(f"the fuzz cannot generate a string for the pattern {pattern}")

    def mutate(self, value: Any) -> Any:
        rng = self.rng
        choice = rng.random()
        if isinstance(value, dict) and value and choice < 0.3:
            key = rng.choice(list(value))
            mutated = dict(value)
            if rng.random() < 0.3:
                del mutated[key]
            else:
                mutated[key] = self.mutate(mutated[key])
            return mutated
        if isinstance(value, dict) and choice < 0.45:
            return value | {
                rng.choice(["extra", "admin", "status", "owner_id"]): rng.choice(EVIL_VALUES)
            }
        if isinstance(value, list) and value and choice < 0.6:
            index = rng.randrange(len(value))
            return [*value[:index], self.mutate(value[index]), *value[index + 1 :]]
        return rng.choice(EVIL_VALUES)


def _satisfies(schema: dict[str, Any], value: Any) -> bool:
    """The part of JSON Schema the document's `contains` clauses use: required properties and
    string patterns."""
    if not isinstance(value, dict):
        return False
    if any(name not in value for name in schema.get("required", [])):
        return False
    for name, prop in schema.get("properties", {}).items():
        if name not in value or "pattern" not in prop:
            continue
        if not isinstance(value[name], str) or not re.search(prop["pattern"], value[name]):
            return False
    return True


def _encode(value: Any, rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return b'{"content": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    if roll < 0.1:
        return rng.choice([b"", b"{", b"nul", b"\xff\xfe", b'{"a": NaN}', b"[1,]", b'"x"'])
    return json.dumps(value, allow_nan=False).encode("utf-8", "surrogatepass")


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url, max_body_bytes=100_000, queue_limit=5) as instance:
        yield instance


async def test_no_request_produces_a_5xx(api: ApiInstance) -> None:
    rng = random.Random(SEED)
    admin = await factories.create_api_user(api.pool, name="root", admin=True)
    user = await factories.create_api_user(api.pool, name="plain")
    # Things that exist, so that generated ids sometimes hit real rows.
    existing = Existing()
    for owner in (admin, user):
        for running in (False, True):
            async with api.client.post(
                "/api/v1/chats", json={"content": "seed"}, headers=owner.headers
            ) as response:
                chat = await response.json()
            chat_id = uuid.UUID(chat["id"])
            existing.chat_ids.append(str(chat_id))
            async with api.pool.acquire() as conn:
                message = await factories.create_message(conn, chat_id=chat_id)
                queued = await factories.create_queued_message(conn, chat_id=chat_id)
            existing.row_ids += [message["id"], queued["id"]]
            if running:
                await SimulatedWorker(api.pool, chat_id).acquire()

    document = api.app[OPENAPI]
    generator = Generator(document, rng)
    failures: list[str] = []
    requests = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for _ in range(CASES_PER_ROUTE):
                url, body, headers = _request(generator, path, operation, existing)
                who = admin if rng.random() < 0.6 else user
                headers = who.headers | headers
                data = _encode(body, rng) if body is not None else None
                requests += 1
                async with api.client.request(
                    method.upper(), url, data=data, headers=headers
                ) as response:
                    status = response.status
                    if status >= 500:
                        answer = await response.text()
                        failures.append(
                            f"{method.upper()} {url} {data!r:.300} -> {status} {answer:.300}"
                        )
                    elif status >= 400 and len(url) > MAX_REQUEST_LINE:
                        assert status == 400  # aiohttp's HTTP parser refuses it, before us
                    elif status >= 400:
                        assert response.content_type == "application/json", (url, status)
                        _check_declared(operation, status, await response.json())
                    # A 200 stream is closed at once by leaving the block.
    assert not failures, "\n".join(failures[:20])
    assert requests >= CASES_PER_ROUTE * 15


def _check_declared(operation: dict[str, Any], status: int, body: Any) -> None:
    """An error body matches exactly one of the models its status declares (ErrorBody for the
    statuses every route may answer: 404 of an unknown path, 405, 413, 503)."""
    names = ["ErrorBody"]
    declared = operation["responses"].get(str(status), {}).get("content", {})
    if "application/json" in declared:
        schema = declared["application/json"]["schema"]
        names = [item["$ref"].rsplit("/", 1)[1] for item in schema.get("oneOf", [schema])]
    matched = []
    for name in names:
        try:
            getattr(http_models, name).model_validate(body)
        except ValidationError:
            continue
        matched.append(name)
    assert len(matched) == 1, (status, body, names)


@dataclass
class Existing:
    chat_ids: list[str] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)  # messages and queue entries


def _request(
    generator: Generator, path: str, operation: dict[str, Any], existing: Existing
) -> tuple[str, Any, dict[str, str]]:
    rng = generator.rng
    url = path
    query: dict[str, str] = {}
    headers: dict[str, str] = {"Content-Type": "application/json"}
    for parameter in operation.get("parameters", []):
        name, where, schema = parameter["name"], parameter["in"], parameter["schema"]
        if where == "path":
            if rng.random() < 0.2:
                segment = rng.choice(EVIL_PATH_SEGMENTS)
            elif schema.get("format") == "uuid":
                segment = rng.choice(existing.chat_ids) if rng.random() < 0.7 else str(uuid.uuid4())
            else:
                segment = str(rng.choice([*existing.row_ids, 1, 10**6]))
            url = url.replace("{" + name + "}", segment)
        elif where == "query" and rng.random() < 0.6:
            value = generator.valid(schema)
            if rng.random() < 0.3:
                value = generator.mutate(value)
            query[name] = value if isinstance(value, str) else json.dumps(value)
        elif where == "header" and rng.random() < 0.5:
            headers[name] = rng.choice(["1:1", "0:0", "garbage", "9" * 30 + ":1", "1:2:3"])
    if query:
        url += "?" + urlencode({k: v.encode("utf-8", "surrogatepass") for k, v in query.items()})
    body = None
    request_body = operation.get("requestBody")
    if request_body is not None or rng.random() < 0.1:
        schema = (
            request_body["content"]["application/json"]["schema"]
            if request_body
            else {"type": "object"}
        )
        body = generator.valid(schema)
        if rng.random() < 0.6:
            body = generator.mutate(body)
    return url, body, headers


async def test_what_the_document_accepts_the_server_accepts(api: ApiInstance) -> None:
    """Requests generated from the document alone, without mutation (real ids in paths, the
    known model config for model_config_id): the server may answer 404, 409 or 429 (state),
    never 400: the document does not accept anything the server rejects."""
    rng = random.Random(SEED + 1)
    admin = await factories.create_api_user(api.pool, name="root", admin=True)
    user = await factories.create_api_user(api.pool, name="plain")
    existing = Existing()
    for owner in (admin, user):
        async with api.client.post(
            "/api/v1/chats", json={"content": "seed"}, headers=owner.headers
        ) as response:
            chat = await response.json()
        chat_id = uuid.UUID(chat["id"])
        existing.chat_ids.append(str(chat_id))
        async with api.pool.acquire() as conn:
            message = await factories.create_message(conn, chat_id=chat_id)
            queued = await factories.create_queued_message(conn, chat_id=chat_id)
        existing.row_ids += [message["id"], queued["id"]]

    document = api.app[OPENAPI]
    generator = Generator(document, rng)
    refused: list[str] = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path.endswith("/ws"):
                continue  # only reachable through a WebSocket upgrade
            for _ in range(CASES_PER_ROUTE // 2):
                url, body = _valid_request(generator, path, operation, existing)
                who = admin if rng.random() < 0.6 else user
                async with api.client.request(
                    method.upper(), url, json=body, headers=who.headers
                ) as response:
                    if response.status == 400 or response.status >= 500:
                        answer = await response.text()
                        refused.append(
                            f"{method.upper()} {url} {body!r:.300} -> {response.status}"
                            f" {answer:.300}"
                        )
    assert not refused, "\n".join(refused[:20])


def _valid_request(
    generator: Generator, path: str, operation: dict[str, Any], existing: Existing
) -> tuple[str, Any]:
    rng = generator.rng
    url = path
    query: dict[str, str] = {}
    for parameter in operation.get("parameters", []):
        name, where, schema = parameter["name"], parameter["in"], parameter["schema"]
        if where == "path":
            if schema.get("format") == "uuid":
                segment = rng.choice(existing.chat_ids)
            else:
                segment = str(rng.choice(existing.row_ids))
            url = url.replace("{" + name + "}", segment)
        elif where == "query" and rng.random() < 0.6:
            value = generator.valid(schema)
            if value is None:
                continue  # a null query parameter is an absent one
            if isinstance(value, bool):
                query[name] = "true" if value else "false"
            else:
                query[name] = value if isinstance(value, str) else json.dumps(value)
    if query:
        url += "?" + urlencode(query)
    body = None
    request_body = operation.get("requestBody")
    if request_body is not None:
        body = generator.valid(request_body["content"]["application/json"]["schema"])
        if isinstance(body, dict) and body.get("model_config_id") is not None:
            body["model_config_id"] = str(factories.ECHO_MODEL_CONFIG_ID)
        if isinstance(body, dict) and body.get("mcp_server_ids"):
            body["mcp_server_ids"] = []  # ids that name no server are refused (400), rightly
    return url, body
