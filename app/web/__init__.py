"""The web page's static files (app/web/static: HTML, plain ES modules, CSS; no build step).
Served by app/http/web_endpoints.py; see docs/web.md."""
