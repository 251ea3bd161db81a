"""The web page (docs/web.md): the page itself at `/` and `/login` (one `index.html`; the script
decides what to show), and each file of app/web/static at `/static/<name>`. The files are read
once, at import, from inside the package (so an installed wheel serves them too), and each gets
a route of its own (app/http/routes.py): no path is ever joined from request input, and the
OpenAPI document lists them.

The page runs with a strict Content-Security-Policy: scripts and styles only from this origin,
no inline script, no framing, connections only to this origin."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files

from aiohttp import web

from app.http.routing import Call, Handler

STATIC_PREFIX = "/static/"
_CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (cheap: 304 by ETag), so a new release is seen at once.
    "Cache-Control": "no-cache",
}
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class StaticFile:
    name: str
    body: bytes
    content_type: str
    etag: str


def load_static_files() -> dict[str, StaticFile]:
    """Every file of app/web/static whose type the page uses, by name."""
    found: dict[str, StaticFile] = {}
    for entry in (files("app.web") / "static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or suffix not in _CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        found[entry.name] = StaticFile(entry.name, body, _CONTENT_TYPES[suffix], etag)
    return dict(sorted(found.items()))


STATIC_FILES = load_static_files()
INDEX = "index.html"


def serve_static(static: StaticFile, *, page: bool) -> Handler:
    async def handler(call: Call) -> web.StreamResponse:
        headers = {**_COMMON_HEADERS, "ETag": static.etag, **(_PAGE_HEADERS if page else {})}
        if static.etag in call.request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=static.body, content_type=static.content_type, charset="utf-8", headers=headers
        )

    return handler


def static_operation_id(name: str) -> str:
    words = re.split(r"[^A-Za-z0-9]+", name)
    return "static" + "".join(word[:1].upper() + word[1:] for word in words if word)
