"""Trainable-parameter report: counts by part, each next to the formula the code implements.

Every count is read off the built model and checked against its formula, so the printed formula cannot drift
from the code. Symbols: d model width, b bottleneck, p proto_dim (z, k_i, e_m), h retriever hidden,
c project hidden, I hypernetwork input d_I, T tasks, L_e encoder layers, L_d decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .model import PHAModel
from .source import FIELD_SLOTS


@dataclass
class Part:
    name: str
    count: int
    formula: str
    expected: int | None  # None: counted only (backbone parts that training unfreezes)


def _n(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_report(model: PHAModel) -> list[Part]:
    cfg = model.config
    d, b, p = model.backbone.d_model, cfg.bottleneck, cfg.proto_dim
    h, c, i = cfg.retriever_hidden, cfg.project_hidden, cfg.hyper_dim
    t, le, ld = len(cfg.tasks), model.n_encoder_layers, model.n_decoder_layers
    adapter = 2 * d * b + b + d
    parts = [
        Part(
            "encoder adapters (shared)",
            _n(model.encoder_adapters),
            f"L_e*(2db+b+d) = {le}*{adapter}",
            le * adapter if model.encoder_adapters is not None else 0,
        ),
        Part(
            f"field-token slots (encoding: {cfg.encoding})",
            _n(model.field_tokens),
            f"(max fields+2)*d = {FIELD_SLOTS}*{d}",
            FIELD_SLOTS * d if model.field_tokens is not None else 0,
        ),
        Part("retriever G", _n(model.retriever), "dh+h+hp+p", d * h + h + h * p + p if model.retriever else 0),
        Part("task prototypes k_i", _n(model.prototypes), f"T*p = {t}*{p}", t * p if model.prototypes else 0),
    ]
    if model.generator is not None:
        n_gen = model.generator.n_layers
        parts += [
            Part("layer embeddings e_m", _n(model.generator.layer_embeddings), f"layers*p = {n_gen}*{p}", n_gen * p),
            Part(
                "project network C",
                _n(model.generator.project),
                "2p*c+c + c*I+I + 2I (LayerNorm)",
                2 * p * c + c + c * i + i + 2 * i,
            ),
            Part(
                "hypernetwork H", _n(model.generator.hyper), f"(I+1)*(2db+b+d) = {i + 1}*{adapter}", (i + 1) * adapter
            ),
        ]
    if model.task_adapters is not None:
        parts.append(
            Part(
                "per-task decoder adapters",
                _n(model.task_adapters),
                f"T*L_d*(2db+b+d) = {t}*{ld}*{adapter}",
                t * ld * adapter,
            )
        )
    start = cfg.backbone.decoder_init if cfg.backbone.kind == "minilm" else "checkpoint"
    label = f"backbone decoder (trainable: {cfg.backbone.decoder_trainable}; starts: {start})"
    parts.append(Part(label, _n(model.backbone), "counted", None))
    for part in parts:
        if part.expected is not None and part.expected != part.count:
            raise AssertionError(f"{part.name}: formula gives {part.expected}, model has {part.count}")
    return parts


def format_report(model: PHAModel) -> str:
    parts = parameter_report(model)
    total = sum(pt.count for pt in parts)
    pha_only = sum(pt.count for pt in parts if pt.expected is not None)
    frozen = sum(pr.numel() for pr in model.parameters() if not pr.requires_grad)
    n_tasks = len(model.config.tasks)
    lines = [f"{'part':<36} {'trainable':>12}  formula"]
    lines += [f"{pt.name:<36} {pt.count:>12,}  {pt.formula}" for pt in parts]
    lines += [
        f"{'total trainable':<36} {total:>12,}",
        f"{'  of which PHA parts':<36} {pha_only:>12,}  ({pha_only / n_tasks:,.0f} per task for {n_tasks} tasks)",
        f"{'frozen backbone':<36} {frozen:>12,}",
        f"{'new task (prototype mode)':<36} {model.config.proto_dim:>12,}  p floats",
    ]
    return "\n".join(lines)
