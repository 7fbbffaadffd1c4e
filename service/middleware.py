"""Two pure-ASGI middlewares (no BaseHTTPMiddleware: it buffers responses and breaks cancellation).

RequestContextMiddleware (outermost): request id in and out, one JSON access line, the latency histogram, and a
JSON 500 (with the request id) for anything unhandled.
BodyLimitMiddleware: refuses bodies over the limit with 413, by Content-Length AND by the bytes that actually
arrive (a chunked body has no Content-Length), and bodies that are not UTF-8 with 400, before any parsing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from .logging import REQUEST_ID_HEADER, end_request, new_request_id, start_request
from .telemetry import Metrics

log = logging.getLogger("pha.access")
_QUIET_PATHS = ("/livez", "/readyz", "/metrics")  # probes and scrapes: access lines at DEBUG only
_BODYLESS = ("GET", "HEAD", "OPTIONS", "DELETE")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, route_label: Callable[[Scope], str]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_label = route_label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id(_header(scope, REQUEST_ID_HEADER.lower().encode()))
        context = start_request(request_id)
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"path": scope["path"]})
            if not status["started"]:
                response = error_response(500, "internal error; the request id identifies it in the server's logs")
                await response(scope, receive, send_with_id)
        finally:
            self._record(scope, status["code"], time.perf_counter() - start, context[2])
            end_request(context)

    def _record(self, scope: Scope, status: int, seconds: float, fields: dict) -> None:
        route = self.route_label(scope)
        self.metrics.request_seconds.labels(route, str(status)).observe(seconds)
        level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
        log.log(
            level,
            "request",
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "route": route,
                "status": status,
                "seconds": round(seconds, 6),
                **fields,
            },
        )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS:
            await self.app(scope, receive, send)
            return
        body = b""
        problem = self._check_declared(_header(scope, b"content-length"))
        if problem is None:
            read = await self._read(receive)
            problem = self._too_large() if read is None else _check_utf8(read)
            body = read or b""
        if problem is not None:
            status, message, reason = problem
            self.on_reject(reason)
            await error_response(status, message)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_declared(self, declared: str | None) -> tuple[int, str, str] | None:
        if declared is None:
            return None
        if not declared.strip().isdigit():
            return 400, f"Content-Length {declared!r} is not a byte count", "invalid"
        if int(declared) > self.max_bytes:
            return self._too_large(int(declared))
        return None

    def _too_large(self, size: int | None = None) -> tuple[int, str, str]:
        got = f"{size} bytes" if size is not None else "more"
        return (
            413,
            f"request body too large: {got}, the limit is {self.max_bytes} bytes (PHA_MAX_BODY_BYTES); "
            "send fewer or shorter texts per request",
            "body_size",
        )

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (the rest is never buffered)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)  # the client left; the app will see the disconnect on its own receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _check_utf8(body: bytes) -> tuple[int, str, str] | None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return 400, f"request body is not valid UTF-8 (byte {exc.start}): send JSON encoded as UTF-8", "invalid"
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then defers to the server's (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def route_matcher(app: FastAPI) -> Callable[[Scope], str]:
    """Label a request by its route template (bounded), also when middleware answered before routing ran.

    Templates come from the app's OpenAPI paths (public API; included routers do not expose their routes), compiled
    as Starlette compiles route paths (`compile_path`).
    """
    patterns: list[tuple[re.Pattern[str], str]] = []

    def label(scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return route.path
        if not patterns:
            for template in app.openapi().get("paths", {}):
                patterns.append((compile_path(template)[0], template))
        for pattern, template in patterns:
            if pattern.match(scope["path"]):
                return template
        return "unmatched"

    return label
