"""A lean HTTP/1.1 keep-alive client for load generation on the server's own machine.

bench/serve.py drives the server from the same 2 cores it measures, so the load generator's CPU is taken from
the server: httpx took 2-5 ms of CPU a request, this client ~0.25 ms (docs/serving.md, session 18); httpx's
share was more than the server's own HTTP handling, and every millisecond of it preempts one of torch's two
OpenMP threads, which stalls the other at the next barrier. This client sends pre-serialised bodies over one
asyncio stream per worker and reads the status line, the headers and a Content-Length or chunked body: nothing
else. It speaks real HTTP to the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import urlsplit


class HttpError(RuntimeError):
    """The server's answer could not be read as HTTP/1.1 (or the connection closed mid-answer)."""


class Connection:
    """One keep-alive connection; requests on it go one after another (like one httpx connection)."""

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"base must be http://host:port, got {base!r}")
        self.host, self.port = url.hostname, url.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Connection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *_exc) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    def request_bytes(self, path: str, body: dict) -> bytes:
        """A POST of `body` as JSON, serialised once (callers keep it and send it many times)."""
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        return head.encode("ascii") + payload

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one serialised request and read its answer: (status, body)."""
        if self._reader is None or self._writer is None:
            raise HttpError("the connection is not open (use `async with Connection(base)`)")
        self._writer.write(request)
        status_line = await self._reader.readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        status = int(parts[1])
        length, chunked = None, False
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            return status, await self._chunked()
        if length is None:
            raise HttpError("an answer without Content-Length or chunked encoding cannot be read on keep-alive")
        return status, await self._reader.readexactly(length)

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        body = bytearray()
        while True:
            size = int((await self._reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await self._reader.readline()  # the blank line after the last chunk (no trailers sent)
                return bytes(body)
            body += await self._reader.readexactly(size)
            await self._reader.readline()
