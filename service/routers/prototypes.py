"""GET /prototypes and GET /prototypes/{name}: the tasks this server can answer."""

from __future__ import annotations

from fastapi import APIRouter

from ..catalog import TaskEntry
from ..deps import StateDep
from ..errors import ServiceError
from ..schemas import PrototypeInfo, PrototypeList

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
    )


@router.get("/prototypes", response_model=PrototypeList, response_model_exclude_none=False)
async def list_prototypes(state: StateDep) -> PrototypeList:
    """Every task: trained ones from the checkpoint, adapted ones added at run time."""
    catalog = state.catalog
    return PrototypeList(prototypes=[_info(e) for e in catalog.entries()], version=catalog.version)


@router.get("/prototypes/{name}", response_model=PrototypeInfo, responses={404: {"description": "unknown task"}})
async def get_prototype(name: str, state: StateDep, include_vector: bool = False) -> PrototypeInfo:
    """One task; `include_vector=true` adds its prototype (the raw vector the hypernetwork reads)."""
    entry = state.catalog.get(name)
    if entry is None:
        known = ", ".join(sorted(state.catalog.names()))
        raise ServiceError(404, f"no task {name!r}; known tasks: {known}", reason="task")
    return _info(entry, include_vector)
