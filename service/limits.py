"""Request limits that depend on settings; each refusal says which limit, its value, and what to change.

The body-size limit lives in middleware.py (it must act before the body is parsed).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ServiceError
from .settings import Settings
from .telemetry import Metrics


@dataclass(frozen=True)
class RequestLimits:
    max_texts: int
    max_input_tokens: int  # PHA_MAX_INPUT_TOKENS, capped by what the model reads unless PHA_TRUNCATE_INPUTS
    model_max_tokens: int
    max_new_tokens: int
    default_new_tokens: int
    allow_backbone_only: bool

    @classmethod
    def from_settings(cls, settings: Settings, model_source_length: int, model_target_length: int) -> RequestLimits:
        return cls(
            max_texts=settings.max_texts,
            max_input_tokens=settings.max_input_tokens
            if settings.truncate_inputs
            else min(settings.max_input_tokens, model_source_length),
            model_max_tokens=model_source_length,
            max_new_tokens=settings.max_new_tokens,
            default_new_tokens=min(model_target_length, settings.max_new_tokens),
            allow_backbone_only=settings.allow_backbone_only,
        )

    def check_texts(self, count: int) -> None:
        if count > self.max_texts:
            raise ServiceError(
                422,
                f"inputs holds {count} texts; this server takes at most {self.max_texts} per request "
                "(PHA_MAX_TEXTS): split it into several requests",
                reason="texts",
            )

    def new_tokens(self, requested: int | None) -> int:
        if requested is None:
            return self.default_new_tokens
        if not 1 <= requested <= self.max_new_tokens:
            raise ServiceError(
                422,
                f"max_new_tokens is {requested}; it must be between 1 and {self.max_new_tokens} on this server "
                "(PHA_MAX_NEW_TOKENS); label words need fewer than 8",
                reason="max_new_tokens",
            )
        return requested

    def check_token_counts(self, counts: list[int]) -> None:
        over = [(i, n) for i, n in enumerate(counts) if n > self.max_input_tokens]
        if not over:
            return
        where = ", ".join(f"inputs[{i}] has {n}" for i, n in over[:5])
        raise ServiceError(
            422,
            f"input too long: {where} tokens; the limit is {self.max_input_tokens} tokens per input "
            f"(PHA_MAX_INPUT_TOKENS, capped by the {self.model_max_tokens} tokens the model reads unless "
            "PHA_TRUNCATE_INPUTS=true): shorten it",
            reason="tokens",
        )

    def check_backbone_only(self, wanted: bool) -> None:
        if wanted and not self.allow_backbone_only:
            raise ServiceError(
                422,
                "backbone_only is a benchmarking switch and is off on this server (PHA_ALLOW_BACKBONE_ONLY)",
                reason="invalid",
            )


class ConcurrencyLimiter:
    """Caps in-flight /predict requests; the excess gets 429 with Retry-After at once (no unbounded queue).

    Used only from the event loop, so a plain counter is enough.
    """

    def __init__(self, limit: int, retry_after: int, metrics: Metrics) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.active = 0
        self._metrics = metrics

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise ServiceError(
                429,
                f"the server is at its limit of {self.limit} concurrent /predict requests "
                f"(PHA_MAX_CONCURRENT_REQUESTS); retry after {self.retry_after} s",
                reason="overload",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.active += 1
        self._metrics.in_flight.inc()

    def release(self) -> None:
        self.active -= 1
        self._metrics.in_flight.dec()
