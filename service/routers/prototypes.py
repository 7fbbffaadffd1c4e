"""GET /prototypes, GET /prototypes/{name} (export) and PUT /prototypes/{name} (import): the tasks served."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Response, status

from pha_core.adapt import AdaptedTensors
from pha_core.tasks import template_fields

from ..catalog import TaskEntry
from ..deps import ApiKey, StateDep
from ..errors import ServiceError
from ..registry import NameTaken, RegisteredTask, RegistryError, check_name
from ..schemas import FIELD_NAME, ImportRequest, PrototypeInfo, PrototypeList

router = APIRouter(tags=["prototypes"])


def _info(entry: TaskEntry, include_vector: bool = False) -> PrototypeInfo:
    return PrototypeInfo(
        name=entry.name,
        source=entry.source,
        template=entry.template,
        labels=list(entry.labels) if entry.labels is not None else None,
        created=entry.created,
        examples=entry.examples,
        version=entry.version,
        prototype_version=entry.prototype_version,
        vector=[float(x) for x in entry.vector] if include_vector else None,
        key=[float(x) for x in entry.key] if include_vector and entry.key is not None else None,
        spread=(entry.spread.center, entry.spread.scale) if entry.spread is not None else None,
    )


@router.get("/prototypes", response_model=PrototypeList, response_model_exclude_none=False)
async def list_prototypes(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="tasks per page")] = 1000,
    offset: Annotated[int, Query(ge=0, le=10**9, description="tasks to skip (`next_offset` of the previous page)")] = 0,
) -> PrototypeList:
    """The tasks, a page at a time: trained ones from the checkpoint first, then adapted ones in the order they
    were added. A million tasks are a thousand pages, not one 300 MB answer."""
    catalog = state.catalog
    page, total = catalog.page(offset, limit)
    more = offset + len(page) < total
    return PrototypeList(
        prototypes=[_info(e) for e in page],
        version=catalog.version,
        total=total,
        next_offset=offset + len(page) if more else None,
    )


@router.get("/prototypes/{name}", response_model=PrototypeInfo, responses={404: {"description": "unknown task"}})
async def get_prototype(name: str, state: StateDep, include_vector: bool = False) -> PrototypeInfo:
    """One task; `include_vector=true` adds its prototype (the raw vector the hypernetwork reads)."""
    entry = state.catalog.get(name)
    if entry is None:
        raise ServiceError(404, f"no task {name!r}; known tasks: {state.catalog.some_names()}", reason="task")
    return _info(entry, include_vector)


@router.put(
    "/prototypes/{name}",
    response_model=PrototypeInfo,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "replaced"}, 401: {}, 403: {}, 409: {}, 422: {}},
)
async def import_prototype(
    name: str, body: ImportRequest, state: StateDep, _: ApiKey, response: Response
) -> PrototypeInfo:
    """Register a prototype-mode task made elsewhere (another deployment's export, an offline `pha adapt`):
    written to the registry like an adapted task, so every replica serves it. 201 when new, 200 when replaced."""
    vector, key = _checked_import(name, body, state)
    existing = state.catalog.get(name)
    entry = RegisteredTask(
        name=name,
        mode="imported",
        job_id="import-" + hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:24],
        model_version=state.engine.model_version,
        k=body.examples or 0,
        labels=body.labels,
        template=body.template,
        spread=list(body.spread) if body.spread is not None else None,
    )
    tensors = AdaptedTensors(vector, key, None).to_bytes()
    try:
        await asyncio.to_thread(state.registry.register, entry, tensors, body.replace)
    except NameTaken as exc:  # another import or job won the name meanwhile
        raise ServiceError(409, str(exc), reason="conflict") from None
    except RegistryError as exc:
        raise ServiceError(503, f"{exc}; retry later", reason="unavailable", headers={"Retry-After": "5"}) from exc
    version = await asyncio.to_thread(state.sync.apply)
    await state.notify_registry(version)
    served = state.catalog.get(name)
    if served is None:
        raise ServiceError(503, f"task {name!r} was registered but is not served yet: {state.sync.error}")
    if existing is not None:
        response.status_code = status.HTTP_200_OK
    return _info(served)


def _checked_import(name: str, body: ImportRequest, state) -> tuple[np.ndarray, np.ndarray]:
    """The prototype and routing key as float32 vectors; every refusal says what to change."""
    try:
        check_name(name)
    except ValueError as exc:
        raise ServiceError(422, str(exc), reason="invalid") from None
    conflict = state.catalog.conflict(name, body.replace)
    if conflict is not None:
        raise ServiceError(409, conflict, reason="conflict")
    if body.model is not None and body.model != state.engine.model_version:
        raise ServiceError(
            409,
            f"the prototype was made for model {body.model[:32]!r}; this server runs {state.engine.model_version!r}, "
            "whose hypernetwork would read it as noise: adapt the task again on this model",
            reason="conflict",
        )
    dim = state.engine.config.proto_dim
    vectors = []
    for field_name, values in (("vector", body.vector), ("key", body.key if body.key is not None else body.vector)):
        v = np.asarray(values, dtype=np.float32)
        if v.shape != (dim,) or not np.all(np.isfinite(v)) or not np.any(v):
            raise ServiceError(
                422, f"{field_name} must be {dim} finite numbers, not all zero (got {v.size})", reason="invalid"
            )
        vectors.append(v)
    _check_labels(body.labels, state)
    if body.template is not None:
        try:
            fields = template_fields(body.template)
        except ValueError:  # unbalanced braces
            fields = ()
        if not fields or not all(FIELD_NAME.fullmatch(f) for f in fields):
            raise ServiceError(
                422, "template needs placeholders with identifier names, e.g. 'review: {review}'", reason="invalid"
            )
    return vectors[0], vectors[1]


def _check_labels(labels: list[str] | None, state) -> None:
    if labels is None:
        return
    if not labels or len(set(labels)) != len(labels):
        raise ServiceError(422, "labels must be distinct label words (at least one)", reason="invalid")
    for word in labels:
        if not word.strip() or not state.engine.can_represent(word):
            raise ServiceError(
                422,
                f"label {word!r} cannot be written by the model's tokenizer; use plain lower-case words",
                reason="invalid",
            )
