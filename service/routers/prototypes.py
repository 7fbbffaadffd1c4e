"""GET /prototypes, GET /prototypes/{name} (export) and PUT /prototypes/{name} (import): the tasks served."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from ..catalog import TaskEntry
from ..deps import ApiKey, StateDep
from ..errors import ServiceError
from ..schemas import ImportRequest, PrototypeInfo, PrototypeList

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
        label_offsets=list(entry.label_offsets) if entry.label_offsets is not None else None,
        label_temperature=entry.label_temperature,
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
    served, created = await state.changes.import_task(name, body)
    if not created:
        response.status_code = status.HTTP_200_OK
    return _info(served)
