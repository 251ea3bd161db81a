"""The route table's machinery. Each route is declared once, with its request models and
answers; the router, authentication, admin checks and the OpenAPI document are all derived from
that one declaration, and a handler can only parse the body and query its route declares."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import asyncpg
from aiohttp import web
from pydantic import BaseModel

from app.config import Settings
from app.db.listener import Listener
from app.errors import Forbidden
from app.http import keys
from app.http.auth import User
from app.http.sessions import authenticate_request
from app.http.validation import path_id, path_uuid, read_body, read_query
from app.state.model import Owner
from app.stream.hub import StreamHubs

M = TypeVar("M", bound=BaseModel)
Handler = Callable[["Call"], Awaitable[web.StreamResponse]]
PathParamKind = Literal["uuid", "id"]


@dataclass(frozen=True)
class Answer:
    """One documented response: a JSON model, a media type with a model for its events, or
    nothing (204). `alternatives`: other bodies the same status may carry (the document says
    oneOf; the models forbid unknown fields, so a body matches exactly one)."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str = "application/json"
    alternatives: tuple[type[BaseModel], ...] = ()

    @property
    def models(self) -> tuple[type[BaseModel], ...]:
        return (self.model, *self.alternatives) if self.model is not None else ()


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    answers: Mapping[int, Answer]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path_params: Mapping[str, PathParamKind] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # documented request headers
    auth: bool = True
    admin: bool = False
    tag: str = "chats"
    description: str = ""


@dataclass(frozen=True)
class Call:
    """One request to a declared route, authenticated when the route requires it."""

    request: web.Request
    route: Route
    user: User | None

    @property
    def me(self) -> User:
        assert self.user is not None, "route declared without auth"
        return self.user

    @property
    def owner(self) -> Owner:
        return self.me.owner

    @property
    def settings(self) -> Settings:
        return self.request.app[keys.SETTINGS]

    @property
    def pool(self) -> asyncpg.Pool:
        return self.request.app[keys.POOL]

    @property
    def listener(self) -> Listener:
        return self.request.app[keys.LISTENER]

    @property
    def hubs(self) -> StreamHubs:
        return self.request.app[keys.STREAM_HUBS]

    def server_tool_names(self) -> Collection[str]:
        return self.request.app[keys.SERVER_TOOL_NAMES]()

    async def body(self, model: type[M]) -> M:
        assert model is self.route.body, f"{self.route.operation_id} declares {self.route.body}"
        return await read_body(self.request, model, max_bytes=self.settings.max_body_bytes)

    def query(self, model: type[M]) -> M:
        assert model is self.route.query, f"{self.route.operation_id} declares {self.route.query}"
        return read_query(self.request, model)

    def path_uuid(self, name: str) -> uuid.UUID:
        assert self.route.path_params.get(name) == "uuid"
        return path_uuid(self.request, name)

    def path_id(self, name: str) -> int:
        assert self.route.path_params.get(name) == "id"
        return path_id(self.request, name)


def endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        user: User | None = None
        if route.auth:
            # A bearer header, else the browser session cookie (with its CSRF check).
            user = await authenticate_request(request)
            if route.admin and not user.is_admin:
                raise Forbidden("this route is for admins")
        return await route.handler(Call(request, route, user))

    handle.__name__ = route.operation_id
    return handle


def add_routes(app: web.Application, routes: list[Route]) -> None:
    for route in routes:
        app.router.add_route(route.method, route.path, endpoint(route), name=route.operation_id)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
