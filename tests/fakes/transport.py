"""Faults below HTTP, inside the SDK's own transport: what a fake server cannot make the client
see. `CancelMidStream` wraps the real httpx2 transport and, for the first `faults` responses,
raises `asyncio.CancelledError` from the response body after `after_chunks` chunks (or at its
end, should the body arrive in fewer: the fault happens whatever the chunking), while
nobody cancelled the caller: what an HTTP/2 RST_STREAM or a cancelled anyio scope inside httpx
looks like to the SDK's caller. Give it to a provider as `http_client=transport.client()`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx2


class CancelMidStream(httpx2.AsyncBaseTransport):
    def __init__(self, *, faults: int = 1, after_chunks: int = 1) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self.faults_left = faults
        self.after_chunks = after_chunks
        self.cancelled = 0  # how many bodies were cut by a CancelledError

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=self)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        if self.faults_left <= 0:
            return response
        self.faults_left -= 1
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_CancelledBody(self, response),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class _CancelledBody(httpx2.AsyncByteStream):
    def __init__(self, transport: CancelMidStream, response: httpx2.Response) -> None:
        self._transport = transport
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in self._response.aiter_raw():
            yield chunk
            sent += 1
            if sent == self._transport.after_chunks:
                break
        self._transport.cancelled += 1
        raise asyncio.CancelledError("stream reset (RST_STREAM)")

    async def aclose(self) -> None:
        await self._response.aclose()
