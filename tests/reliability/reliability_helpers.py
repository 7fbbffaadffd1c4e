"""Helpers of the reliability tests alone, imported by module name (pytest puts this folder on sys.path); what
bench/ uses too lives in tests/support/."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import redis

from service.registry import RegisteredTask, SqliteRegistry, all_changes

KEY = "reliability-" + uuid.uuid4().hex  # the API key of these tests; never to be seen in a log
AUTH = {"Authorization": f"Bearer {KEY}"}


def scale(name: str, default: int) -> int:
    """A bound of a test (rounds, seconds...): `default` in CI, raised by bench/soak.py through PHA_SOAK_<NAME>."""
    return int(os.environ.get(f"PHA_SOAK_{name.upper()}", default))


def shots(tag: str, k: int = 4) -> list[dict[str, str]]:
    labels = ["entailment", "neutral", "contradiction"]
    texts = [f"premise: {tag} case {i}. hypothesis: {tag} claim {i}." for i in range(k)]
    return [{"input": text, "target": labels[i % 3]} for i, text in enumerate(texts)]


def adapt_body(task: str, steps: int, k: int = 4) -> dict:
    return {"task": task, "examples": shots(task, k), "steps": steps}


def register_task(registry_dir: Path, name: str, model_version: str, seed: int = 0, dim: int = 16) -> RegisteredTask:
    """An adapted task written straight into the registry, as a worker would (a random prototype)."""
    from pha_core.adapt import AdaptedTensors

    rng = np.random.default_rng(seed)
    vector = rng.standard_normal(dim).astype(np.float32)
    tensors = AdaptedTensors(vector, vector.copy(), None).to_bytes()
    entry = RegisteredTask(
        name=name,
        mode="prototype",
        source_task="sst2",
        source_score=0.5,
        k=4,
        steps=5,
        final_loss=0.1,
        job_id=uuid.uuid4().hex,
        model_version=model_version,
    )
    store = SqliteRegistry.in_folder(registry_dir)
    try:
        registered, _ = store.register(entry, tensors)
    finally:
        store.close()
    return registered


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (the registry's own files are digested by their
    content instead: SQLite rewrites its index files on reads too)."""
    if not folder.exists():
        return {}
    digests = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("registry.sqlite3")
    }
    if (folder / "registry.sqlite3").exists():
        digests["registry.sqlite3 (rows)"] = json.dumps(registry_state(folder), sort_keys=True)
    return digests


def registry_state(registry_dir: Path) -> dict:
    """The sqlite registry as replicas see it: the last change's seq and every live task's record."""
    store = SqliteRegistry.in_folder(registry_dir)
    try:
        tasks = {c.name: asdict(c.task) for c in all_changes(store) if c.task is not None}
        return {"version": store.head(), "tasks": tasks, "rows": len(list(all_changes(store)))}
    finally:
        store.close()


def stream_state(client: redis.Redis, stream: str, group: str) -> dict[str, int]:
    """Entries in the job stream, delivered but not acknowledged (pending), and not yet delivered (lag)."""
    if not client.exists(stream):
        return {"length": 0, "pending": 0, "lag": 0}
    groups = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
    info = groups.get(group)
    return {
        "length": client.xlen(stream),
        "pending": int(info["pending"]) if info else 0,
        "lag": int(info.get("lag") or 0) if info else client.xlen(stream),
    }
