"""What the registry stores per task, and the change records replicas read.

A task is one record (the fields below, as compact JSON) plus its tensors (safetensors: the prototype and the
routing key in float16, and the explicit adapters of "adapter"-mode tasks), checked by a digest of both. For a
prototype-mode task that is under 1 KB (bench/scale.py prints the measured figure).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pha_core.adapt import AdaptResult

_DECODER = json.JSONDecoder()  # stateless: one for every record

# Lower-case letters, digits and . _ -; starts with a letter or digit; no path separators or control characters.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class RegistryError(RuntimeError):
    """The registry cannot be read or written; the message names the store and what is wrong."""


class NameTaken(ValueError):
    """Another job's task already has this name and `replace` was not asked for (the API answers 409)."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid task name {name!r}: use 1-64 characters a-z, 0-9, '.', '_' or '-', starting with a letter or"
            " digit (no path separators, no '..')"
        )
    return name


def name_taken(name: str) -> NameTaken:
    """The one wording of the name-conflict rule (store, worker and API alike)."""
    return NameTaken(f'task {name!r} already exists; send "replace": true to overwrite it')


@dataclass(kw_only=True)
class RegisteredTask:
    """One adapted task as the registry records it. Built with `adapted` (a worker's job) or directly (PUT
    /prototypes); `seq` is the registry's to set (the change that wrote it)."""

    name: str
    mode: str
    job_id: str
    model_version: str
    seq: int = 0
    source_task: str = ""
    source_score: float = 0.0
    k: int = 0
    steps: int = 0
    final_loss: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    labels: list[str] | None = None
    heldout: dict[str, float] | None = None
    template: str | None = None
    spread: list[float] | None = None  # [center, scale] of its examples' route cosines (typicality); None: none
    label_offsets: list[float] | None = None  # one per label: its fitted log-likelihood offset; None: none
    label_temperature: float = 1.0  # divides the label log-likelihoods (an imported trained task's); 1: none

    @classmethod
    def adapted(
        cls, name: str, result: AdaptResult, *, job_id: str, model_version: str, **extra: object
    ) -> RegisteredTask:
        """The record of a task `pha_core.adapt.adapt_task` made, with its labels and their fitted offsets
        (extra: heldout, template)."""
        spread = [result.spread.center, result.spread.scale] if result.spread is not None else None
        offsets = None if result.label_offsets is None else [float(x) for x in result.label_offsets]
        return cls(
            name=name,
            mode=result.mode,
            job_id=job_id,
            model_version=model_version,
            source_task=result.source_task,
            source_score=result.source_score,
            k=result.k,
            steps=result.steps,
            final_loss=result.final_loss,
            spread=spread,
            labels=list(result.labels) if result.labels is not None else None,
            label_offsets=offsets,
            **extra,
        )

    def to_json(self) -> bytes:
        """Compact JSON without the fields left at their defaults (seq is the store's column, not the record's)."""
        defaults = {f.name: f.default for f in fields(self) if not callable(f.default_factory)}
        body = {k: v for k, v in asdict(self).items() if k != "seq" and defaults.get(k, object()) != v}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, seq: int) -> RegisteredTask:
        body = _DECODER.decode(data.decode("utf-8"))  # json.loads(bytes) sniffs the encoding first: a replica
        # catching up reads a million of these, and they are UTF-8 by construction (to_json)
        if not isinstance(body, dict):
            raise ValueError("the record is not a JSON object")
        return cls(**body, seq=seq)


def digest(record: bytes, tensors: bytes) -> str:
    """What a stored task is checked against: sha256 of its record and tensors (128 bits are plenty to catch
    corruption; this is not a signature)."""
    h = hashlib.sha256(record)
    h.update(b"\0")
    h.update(tensors)
    return h.hexdigest()[:32]


class Change(NamedTuple):
    """One entry of the change log, as a replica applies it: the task's state after change `seq`.

    `task` None: the task was removed. `error` set: the stored record is corrupt (named in the message) and must
    not be served; the rest of the log is unaffected. (A named tuple: a fresh replica reads a million, and one
    is built in a third of a frozen dataclass's time.)
    """

    seq: int
    name: str
    task: RegisteredTask | None = None
    tensors: bytes | None = None
    error: str | None = None

    @classmethod
    def read(cls, store: str, seq: int, name: str, record: bytes | None, tensors: bytes | None, checked: str | None):
        """Decode one stored row; corruption becomes `error`, never an exception."""
        if record is None:
            return cls(seq, name)
        if isinstance(checked, bytes):  # sqlite keeps the 16 raw bytes, redis the hex text
            checked = checked.hex() if len(checked) == 16 else checked.decode("ascii", "replace")
        if tensors is None or checked != digest(record, tensors):
            why = "is corrupt (digest mismatch)"
            return cls(seq, name, error=f"registry record {name!r} (change {seq}) in {store} {why}")
        try:
            return cls(seq, name, RegisteredTask.from_json(record, seq), tensors)
        except (ValueError, TypeError) as exc:
            return cls(seq, name, error=f"registry record {name!r} (change {seq}) in {store} is unreadable: {exc}")
