"""All service settings, from `PHA_*` environment variables (pydantic-settings). Defaults need none of them.

One class for the API, the worker and the CLI, so docker-compose, Kubernetes and `pha serve` can only name
settings that exist (tests/deploy/test_deploy_files.py checks the deployment files against this class).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _user_data() -> Path:
    """The per-user data folder of the XDG base-directory convention (containers set PHA_REGISTRY_DIR)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "pha-serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PHA_", env_file=None, extra="ignore")

    # --- where things are
    host: str = Field("127.0.0.1", description="bind address of `pha serve`")
    port: int = Field(8000, ge=1, le=65535, description="port of `pha serve`")
    checkpoint: str = Field(
        "", description="PHA checkpoint directory; empty = the bundled demo checkpoint (see README)"
    )
    device: str = Field("cpu", description="torch device of the API (cpu, cuda, auto)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="matmul precision of the model: bf16 stores the backbone in bf16 and runs under bf16 autocast, "
        "as training does (1.2-1.6x the requests per second on 2 cores with AVX512-BF16; the demo's test average 0.693 "
        "instead of 0.697, docs/serving.md); auto: bf16 where the device does it natively",
    )
    redis_url: str = Field(
        "",
        description="Redis for the adapter cache, job stream and registry notices; "
        "empty = in-process cache only, no /adapt",
    )
    registry_dir: Path = Field(
        default_factory=lambda: _user_data() / "registry",
        description="folder of the sqlite registry store (registry.sqlite3; a volume); default: the user's data "
        "folder ($XDG_DATA_HOME/pha-serve/registry), never the working directory",
    )
    registry_store: Literal["sqlite", "redis"] = Field(
        "sqlite",
        description="where adapted tasks are kept: sqlite (a file in registry_dir, one machine) or redis (the "
        "Redis of redis_url, with AOF persistence: many replicas on many machines)",
    )

    # --- security
    api_key: SecretStr = Field(SecretStr(""), description="Bearer key for /adapt and DELETE; empty = refused")
    dev_mode: bool = Field(False, description="allow mutations without an API key (development only)")

    # --- request limits
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body limit (413 above)")
    max_texts: int = Field(64, ge=1, description="texts per /predict request")
    max_input_tokens: int = Field(512, ge=8, description="tokens per input text (422 above)")
    truncate_inputs: bool = Field(
        False,
        description="inputs longer than the model reads (128 tokens by default) are cut to it, as in "
        "training; off: refused with 422 (never silently cut)",
    )
    both_orders: bool = Field(
        True,
        description="answer the tasks whose two fields may come in either order (STS-B) with the mean of both "
        "orders' readings (the demo's STS-B test score 0.856 instead of 0.841), at one more encoder and decoder "
        "pass for each such row (-16% requests/s on a mixed 8-task load on 2 cores, docs/serving.md); off: one order",
    )
    max_new_tokens: int = Field(32, ge=1, le=512, description="upper bound of a request's max_new_tokens")
    max_concurrent_requests: int = Field(64, ge=1, description="in-flight /predict requests (429 above)")
    retry_after_seconds: int = Field(1, ge=1, description="Retry-After sent with 429")

    # --- batching
    max_batch_size: int = Field(32, ge=1, description="texts per model call (micro-batch)")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a micro-batch waits to fill")
    allow_backbone_only: bool = Field(
        False,
        description="accept `backbone_only: true` on /predict: the backbone without adapters, for the "
        "benchmark's baseline (off in production)",
    )
    warmup: bool = Field(
        True,
        description="at start-up, pre-generate every trained task's adapters and run one "
        "real prediction before accepting traffic",
    )

    # --- routing
    faiss_threads: int = Field(
        1,
        ge=1,
        description="FAISS OpenMP threads for exact routing searches (1 was fastest up to 100k prototypes here)",
    )
    faiss_ivf_threads: int = Field(
        2,
        ge=1,
        description="threads of the native scan of template groups over 20,000 tasks (approximate IVF indexes, "
        "service/cell_index.py): a batch's probed cells are split over them when each gets ~0.1 ms of work (the "
        "model thread waits for routing meanwhile)",
    )
    faiss_nprobe: int = Field(
        96, ge=1, description="IVF cells read per query in large groups: recall against speed (docs/serving.md)"
    )
    min_route_score: float = Field(-1.0, ge=-1.0, le=1.0, description="cosine below which a route is low")
    low_score_action: Literal["flag", "refuse"] = Field(
        "flag", description="below min_route_score: serve with low_confidence=true, or refuse with 422"
    )
    min_route_typicality: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="a routed input whose typicality for its nearest task is below this (the share of that "
        "task's held-out rows it is less typical than; pha_core/calibration.py) fits no task. 0.02 turns away "
        "about 2% of in-task inputs",
    )
    no_fit_action: Literal["abstain", "refuse", "flag"] = Field(
        "abstain",
        description="when no task fits a routed input: answer it with output null and route.fits false "
        "(abstain), refuse the request with 422 (refuse), or answer with the nearest task anyway, "
        "low_confidence true (flag)",
    )
    content_check: bool = Field(
        True,
        description="judge routed inputs of the checkpoint's trained tasks by their text against the task's "
        "training texts (pha_core/content.py; needs the checkpoint's content_bank.npz): a second encoder pass "
        "per routed input. false: by the route cosine alone (faster, lets more out-of-task text through)",
    )

    # --- adapter cache
    l1_cache_size: int = Field(256, ge=1, description="adapter sets kept in process memory (LRU)")
    l1_cache_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="bytes of adapter sets kept in process memory (LRU; whichever of this and l1_cache_size is "
        "reached first); 256 MiB holds ~650 sets of the demo (2 decoder layers, 0.39 MB a set)",
    )
    redis_ttl_seconds: int = Field(7 * 24 * 3600, ge=1, description="expiry of cached adapters in Redis")
    redis_timeout_seconds: float = Field(0.25, gt=0, description="socket timeout of cache calls")
    redis_backoff_seconds: float = Field(
        5.0, ge=0, description="after a Redis error, skip Redis for this long (a dead Redis costs no latency)"
    )

    # --- adaptation jobs (worker)
    job_stream: str = Field("pha:jobs", description="Redis stream of /adapt jobs")
    job_group: str = Field("pha-workers", description="consumer group of the workers")
    worker_name: str = Field("", description="consumer name (default: hostname-pid)")
    job_max_attempts: int = Field(3, ge=1, description="deliveries before a job is marked failed")
    job_idle_ms: int = Field(60_000, ge=1000, description="a job unacknowledged this long is reclaimed")
    max_adapt_examples: int = Field(64, ge=1, description="k limit of /adapt")
    max_adapt_steps: int = Field(1000, ge=1, description="steps limit of /adapt")
    registry_poll_seconds: float = Field(
        2.0, gt=0, description="how often a replica re-reads the registry (besides Redis notices)"
    )

    log_level: str = Field("INFO", description="log level (JSON logs)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("cpu", "auto") and not value.startswith("cuda"):
            raise ValueError("device must be cpu, auto or cuda[:N]")
        return value
