"""The HTTP room: aiohttp application, routes, auth, streams over SSE and WebSocket."""
