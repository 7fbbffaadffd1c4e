"""Checkpoints: only the trained tensors (safetensors) + a JSON config naming the backbone and recipe.

Layout of a checkpoint directory:
    config.json          {"pha": PHAConfig, "recipe": how it was trained, "backbone_fingerprint": ...}
    model.safetensors    the trainable tensors only (adapters, G, prototypes, C, H, trainable decoder parts)
    trainer_state.pt     optional: optimizer/scheduler/step for `pha train --resume` (tensors only)

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so a crash
never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import PHAConfig
from .model import PHAModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model; the message says which."""


def backbone_fingerprint(model: PHAModel) -> str:
    """A short hash of the frozen input embeddings: detects a checkpoint loaded onto another backbone."""
    emb = model.backbone.get_submodule(_embedding_path(model)).weight.detach().float().cpu().contiguous()
    return hashlib.sha256(emb.numpy().tobytes()).hexdigest()[:16]


def _embedding_path(model: PHAModel) -> str:
    return "model.shared" if model.config.backbone.kind == "t5" else "encoder.embeddings.word_embeddings"


def save_checkpoint(
    model: PHAModel,
    path: str | Path,
    recipe: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the checkpoint atomically (temp directory + rename) and return its path.

    `dtype` (e.g. torch.float16) stores the tensors smaller; call `round_trainable` first so the model in
    memory equals what is stored and save -> load stays bit-identical.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = {
            k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.trainable_state_dict().items()
        }
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        meta = {
            "pha": model.config.to_dict(),
            "recipe": recipe or {},
            "backbone_fingerprint": backbone_fingerprint(model),
            "format": 1,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        # mkdtemp makes the directory private (0700); a checkpoint is read by other users (container images).
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@torch.no_grad()
def round_trainable(model: PHAModel, dtype: torch.dtype) -> None:
    """Round every trained tensor through `dtype` in place (the weights a `dtype` checkpoint will hold)."""
    for param in model.trainable_parameters():
        param.copy_(param.to(dtype))


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into `target`; the old version is removed only after the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {CONFIG_FILE} is missing (train one with `pha train`)")
    try:
        meta = json.loads(cfg_file.read_text())
        meta["pha"] = PHAConfig.from_dict(meta["pha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file} is not a valid PHA checkpoint config: {exc}") from exc
    return meta


def load_checkpoint(path: str | Path, expect: PHAConfig | None = None, device: str = "cpu") -> PHAModel:
    """Build the model the checkpoint names and load its tensors, checking that everything fits."""
    path = Path(path)
    meta = read_meta(path)
    config: PHAConfig = meta["pha"]
    if expect is not None and expect.architecture() != config.architecture():
        raise CheckpointError(
            f"checkpoint {path} does not match the requested model: "
            f"{_diff(expect.architecture(), config.architecture())}"
        )
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from exc
    model = PHAModel(config)
    fingerprint = meta.get("backbone_fingerprint")
    if fingerprint and fingerprint != backbone_fingerprint(model):
        raise CheckpointError(
            f"checkpoint {path} was trained on another version of backbone {config.backbone.name!r} "
            "(embedding fingerprint differs); load it with the backbone files it was trained with"
        )
    load_trainable(model, tensors, source=str(path))
    return model.to(device).eval()


def load_trainable(model: PHAModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        details = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {[(k, tuple(tensors[k].shape), tuple(expected[k].shape)) for k in wrong[:3]]}"
            if wrong
            else "",
        ]
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(d for d in details if d))
    model.load_state_dict(tensors, strict=False)


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            inner = _diff(va, vb, f"{prefix}{key}.")
            if inner:
                out.append(inner)
        elif va != vb:
            out.append(f"{prefix}{key}: requested {va!r}, checkpoint has {vb!r}")
    return "; ".join(out)
