"""JSON logs, one object per line, carrying the request id of the request being served.

The request id comes from the client's X-Request-ID when it is a sane token, else a fresh one; it is returned in
the response header and stamped on every log line written while the request runs (a context variable, so
concurrent requests never mix ids).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("pha_request_id", default=None)
# Fields that handlers add to their request's access line (task, texts, ...): one log line per request.
_request_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("pha_fields", default=None)
# Accept what tracing systems send (uuids, hex, w3c ids) and nothing that could forge log lines or headers.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}
_HANDLER_NAME = "pha-json"


def new_request_id(client_value: str | None) -> str:
    if client_value and _SAFE_ID.match(client_value):
        return client_value
    return uuid.uuid4().hex


def start_request(request_id: str) -> tuple[contextvars.Token, contextvars.Token, dict[str, Any]]:
    """Bind a request id and an empty field dict to the current context; returns what `end_request` needs."""
    fields: dict[str, Any] = {}
    return _request_id.set(request_id), _request_fields.set(fields), fields


def end_request(tokens: tuple[contextvars.Token, contextvars.Token, dict[str, Any]]) -> None:
    _request_id.reset(tokens[0])
    _request_fields.reset(tokens[1])


def annotate(**fields: Any) -> None:
    """Add fields to the access line of the request being served (no-op outside a request)."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


def current_request_id() -> str | None:
    return _request_id.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = _request_id.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """Route the root logger (and uvicorn's) to one JSON handler on stderr. Idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The service writes its own access line (with request id and latency); uvicorn's would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True
