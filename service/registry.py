"""The registry of adapted tasks: the durable source of truth, a folder on a volume shared by API and workers.

    <PHA_REGISTRY_DIR>/
        manifest.json                     {"version": N, "tasks": {name: entry}}   (the only index)
        tasks/<name>-<digest>.safetensors  prototype, routing key, and the adapters of "adapter"-mode tasks
        .lock                              advisory lock: one writer at a time, across processes

Every write is temp file + fsync + rename, tensors before the manifest that names them, so a crash leaves the
previous version whole. Readers check each tensor file's sha256 against the manifest; a corrupt or truncated
registry raises `RegistryError` and the API keeps serving the last good version it loaded.
Registration is idempotent by job id: a job that runs twice (at-least-once delivery) registers once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pha_core.adapt import AdaptResult

MANIFEST = "manifest.json"
# Lower-case letters, digits and . _ -; starts with a letter or digit; no path separators or control characters.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class RegistryError(RuntimeError):
    """The registry cannot be read or written; the message names the file and what is wrong."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid task name {name!r}: use 1-64 characters a-z, 0-9, '.', '_' or '-', starting with a letter or"
            " digit (no path separators, no '..')"
        )
    return name


@dataclass(kw_only=True)
class RegisteredTask:
    """One adapted task as the manifest records it (tensors live in `file`). Built with `adapted` (a worker's
    job) or `imported` (PUT /prototypes); `file` and `sha256` are the registry's to set."""

    name: str
    mode: str
    job_id: str
    model_version: str
    file: str = ""
    sha256: str = ""
    source_task: str = ""
    source_score: float = 0.0
    k: int = 0
    steps: int = 0
    final_loss: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    labels: list[str] | None = None
    heldout: dict[str, float] | None = None
    template: str | None = None
    spread: list[float] | None = None  # [center, scale] of its examples' route cosines (typicality); None: none

    @classmethod
    def adapted(
        cls, name: str, result: AdaptResult, *, job_id: str, model_version: str, **extra: object
    ) -> RegisteredTask:
        """The record of a task `pha_core.adapt.adapt_task` made (extra: labels, heldout, template)."""
        spread = [result.spread.center, result.spread.scale] if result.spread is not None else None
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
            **extra,
        )


@dataclass
class Snapshot:
    version: int
    tasks: dict[str, RegisteredTask]


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------------------------- reading
    def snapshot(self) -> Snapshot:
        """The manifest as it is now (version 0 and no tasks when the registry is new)."""
        path = self.root / MANIFEST
        if not path.exists():
            return Snapshot(0, {})
        try:
            data = json.loads(path.read_text())
            tasks = {name: RegisteredTask(**entry) for name, entry in data["tasks"].items()}
            return Snapshot(int(data["version"]), tasks)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: wrong shape
            raise RegistryError(f"registry manifest {path} is unreadable or corrupt: {exc}") from exc

    def version(self) -> int:
        return self.snapshot().version

    def read_tensors(self, task: RegisteredTask) -> bytes:
        """The task's safetensors bytes, verified against the manifest's sha256."""
        path = self.root / "tasks" / task.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RegistryError(f"registry file {path} of task {task.name!r} is missing: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != task.sha256:
            raise RegistryError(f"registry file {path} of task {task.name!r} is corrupt (sha256 mismatch)")
        return data

    # ----------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def register(self, task: RegisteredTask, tensors: bytes, replace: bool = False) -> tuple[RegisteredTask, bool]:
        """Store the task; returns (entry, created). Idempotent: the same job id again returns the stored entry.

        A different job for an existing name needs `replace` (ValueError otherwise: the API answers 409).
        """
        check_name(task.name)
        with self._locked():
            snap = self.snapshot()
            current = snap.tasks.get(task.name)
            if current is not None and current.job_id == task.job_id:
                return current, False
            if current is not None and not replace:
                raise ValueError(f"task {task.name!r} already exists; send replace=true to overwrite it")
            task.sha256 = hashlib.sha256(tensors).hexdigest()
            task.file = f"{task.name}-{task.sha256[:12]}.safetensors"
            _atomic_write(self.root / "tasks" / task.file, tensors)
            tasks = {**snap.tasks, task.name: task}
            self._write_manifest(snap.version + 1, tasks)
            if current is not None and current.file != task.file:
                (self.root / "tasks" / current.file).unlink(missing_ok=True)
            return task, True

    def remove(self, name: str) -> RegisteredTask | None:
        with self._locked():
            snap = self.snapshot()
            current = snap.tasks.get(name)
            if current is None:
                return None
            self._write_manifest(snap.version + 1, {k: v for k, v in snap.tasks.items() if k != name})
            (self.root / "tasks" / current.file).unlink(missing_ok=True)
            return current

    def _write_manifest(self, version: int, tasks: dict[str, RegisteredTask]) -> None:
        body = {"version": version, "tasks": {name: asdict(t) for name, t in sorted(tasks.items())}}
        _atomic_write(self.root / MANIFEST, json.dumps(body, indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
