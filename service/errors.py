"""The one error type the service raises on purpose, and how every error becomes a JSON answer.

Every error body is `{"detail": "<what went wrong and what to change>", "request_id": "..."}`; validation errors
add `errors`, pydantic's list without the offending input echoed back (it may be a megabyte of text).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from .logging import current_request_id


class ServiceError(Exception):
    """An answer other than 200: status, a message for the client, and a bounded `reason` for metrics."""

    def __init__(self, status: int, message: str, *, reason: str = "invalid", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict | None = None, **extra: object) -> JSONResponse:
    body = {"detail": message, "request_id": current_request_id(), **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


_BODY_SHAPE = 'send a JSON object such as {"inputs": "sentence: a fine film"} with Content-Type: application/json'


def _message(error: dict) -> str:
    """pydantic's message, rephrased where it would not tell a client what to change."""
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')}); {_BODY_SHAPE}"
    if error["type"] in ("model_attributes_type", "dict_type") and tuple(error["loc"]) == ("body",):
        return f"the body must be a JSON object; {_BODY_SHAPE}"
    return f"{_location(error['loc'])}: {error['msg'].removeprefix('Value error, ')}"


def describe_validation(exc: RequestValidationError) -> tuple[str, list[dict]]:
    """A one-line message naming each bad field, and the errors without their inputs."""
    raw = list(exc.errors())
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in raw]
    parts = [_message(e) for e in raw[:5]]
    more = f" (and {len(raw) - 5} more)" if len(raw) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, errors


def install_error_handlers(app: FastAPI, on_reject) -> None:
    """`on_reject(reason)` counts refused requests by reason."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        on_reject(exc.reason)
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_reject("invalid")
        message, errors = describe_validation(exc)
        return error_response(422, message, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route of the path; list them all
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(exc.status_code, str(exc.detail), headers)


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))
