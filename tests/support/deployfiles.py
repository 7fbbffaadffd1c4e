"""Readers for the deployment files, shared by tests/deploy/ and bench/compose_local.py.

- a tiny kustomize renderer (resources, namespace, labels, images, JSON 6902 patches: what k8s/ uses), checked
  against `kubectl kustomize` where kubectl exists;
- a Dockerfile reader (instructions with continuations, ARG/ENV values, exec-form CMD/HEALTHCHECK);
- compose helpers: `${VAR:-default}` interpolation and the merge of an override file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------------------------- kustomize


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` prints, for the subset of kustomize that k8s/ uses."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
    assert not unknown, f"{directory}: the test renderer does not implement {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        objects += render_kustomization(path) if path.is_dir() else load_yaml_docs(path)
    objects = copy.deepcopy(objects)
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), "only JSON 6902 patches (a list of operations) are implemented"
        targets = [o for o in objects if _matches(o, patch["target"])]
        assert targets, f"patch {patch['path']} matches no object"
        for obj in targets:
            for op in ops:
                _json_patch(obj, op)
    for image in kust.get("images", []):
        for container in _containers(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for label in kust.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return objects


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(want[k] == v for k, v in target.items())


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json_patch(doc: Any, op: dict[str, Any]) -> None:
    *parents, last = _pointer(op["path"])
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    kind = op["op"]
    if kind == "test":
        assert node[key] == op["value"], f"patch test failed at {op['path']}: {node[key]!r} != {op['value']!r}"
    elif kind == "remove":
        del node[key]
    elif kind == "replace":
        node[key]  # noqa: B018 - must exist
        node[key] = copy.deepcopy(op["value"])
    elif kind == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"JSON patch op {kind!r} is not implemented by the test renderer")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def _containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for obj in objects:
        spec = pod_spec(obj)
        if spec:
            out += spec.get("initContainers", []) + spec["containers"]
    return out


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


# --------------------------------------------------------------------------------------------- Dockerfiles


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, rest of the line with continuations joined)
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults (last definition wins)
    env: dict[str, str] = field(default_factory=dict)  # ENV of the final stage

    def all(self, name: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == name]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (ins, _) in enumerate(self.instructions) if ins == "FROM"]
        return self.instructions[starts[-1] :]


def read_dockerfile(path: Path) -> Dockerfile:
    instructions: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        ins, _, rest = buf.partition(" ")
        instructions.append((ins.upper(), rest.strip()))
        buf = ""
    df = Dockerfile(path, instructions)
    for ins, rest in instructions:
        if ins == "ARG":
            name, _, default = rest.partition("=")
            df.args[name] = _unquote(default)
    for ins, rest in df.final_stage():
        if ins == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                df.env[name] = value
    return df


def _unquote(value: str) -> str:
    return shlex.split(value)[0] if value.strip() else ""


def exec_form(rest: str) -> list[str]:
    """`CMD ["pha", "serve"]` -> ["pha", "serve"]; HEALTHCHECK options before CMD are dropped."""
    if rest.startswith("--") or rest.startswith("CMD"):
        rest = rest[rest.index("CMD") + 3 :].strip()
    value = json.loads(rest)
    assert isinstance(value, list), f"use the exec form (a JSON list), not {rest!r}"
    return value


def expand_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


# --------------------------------------------------------------------------------------------- compose

_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR-default}` with `env` (default: the process's)."""
    env = dict(os.environ) if env is None else env
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        current = env.get(name)
        if op == ":-":
            return current if current else default
        if op == "-":
            return current if current is not None else default
        if op and "?" in op and not current:
            raise KeyError(f"{name} is required: {default}")
        return current or ""

    return _INTERPOLATION.sub(one, value)


def merge_compose(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge an override file the way `docker compose -f a -f b` does for mappings (sequences are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_compose(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_volumes(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, container path, read_only) of each short-syntax volume."""
    out = []
    for item in service.get("volumes", []):
        parts = item.split(":")
        source, target = parts[0], parts[1]
        out.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
    return out
