"""Multi-task training (paper section 3 and 4.1): proportional mixing, AdamW, linear warm-up and decay.

Runs unchanged on the CPU, on one GPU, and on several under `torchrun` / `accelerate launch` (DDP: each rank
draws its own batches from a rank-seeded mixer, gradients are averaged, rank 0 logs and writes checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from . import runtime
from .checkpoint import TRAINER_FILE, load_checkpoint, read_meta, round_trainable, save_checkpoint
from .collate import collate_buckets, label_weights
from .config import PHAConfig
from .data import ProportionalMixer, load_splits
from .files import write_atomic
from .model import PHAModel
from .precision import autocast, resolve_precision
from .recipes import TrainConfig
from .tasks import Example, get_task


class FrozenInLowPrecision:
    """Frozen parameters stored in bf16 while training, the float32 originals put back bit-exactly after.

    Under autocast every frozen weight would be cast to bf16 on every call; storing them in bf16 once saves
    that copy (the trainable parts, their gradients and the optimiser stay float32). `restore()` puts the
    float32 tensors back, so what is evaluated and saved is the model a checkpoint loads; `paused()` does so for
    the duration of a save in the middle of training (the backbone fingerprint is taken from those weights).
    """

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self._model = model
        self._originals: dict[str, torch.Tensor] = {}
        if enabled:
            self._originals = {
                name: p.data for name, p in model.named_parameters() if not p.requires_grad and p.dtype == torch.float32
            }
            self._apply()

    def _apply(self) -> None:
        params = dict(self._model.named_parameters())
        for name, original in self._originals.items():
            params[name].data = original.to(torch.bfloat16)

    def restore(self) -> None:
        params = dict(self._model.named_parameters())
        for name, original in self._originals.items():
            params[name].data = original
        self._originals = {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if not self._originals:
            yield
            return
        params = dict(self._model.named_parameters())
        for name, original in self._originals.items():
            params[name].data = original
        try:
            yield
        finally:
            self._apply()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup_distributed(device: torch.device) -> Distributed:
    dist_info = Distributed.from_env()
    if dist_info.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist_info


def load_data(cfg: TrainConfig) -> dict[str, dict[str, list[Example]]]:
    from .data import data_dir_from_env

    data_dir = None if cfg.data_dir == "hf" else Path(cfg.data_dir) if cfg.data_dir else data_dir_from_env()
    return load_splits(
        cfg.tasks,
        data_dir,
        seed=cfg.split_seed,
        n_train=cfg.n_train,
        fraction=cfg.fraction,
        max_eval=cfg.max_eval,
        sample_seed=cfg.seed,
    )


class Trainer:
    """Owns the model, optimiser, schedule and data stream of one training run."""

    def __init__(self, cfg: TrainConfig, model_cfg: PHAConfig, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.device = torch.device(runtime.resolve_device(cfg.device))
        if cfg.device == "auto" and self.device.type == "cuda":
            torch.cuda.set_device(Distributed.from_env().local_rank)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dist = setup_distributed(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.output = Path(cfg.output)
        self.splits = load_data(cfg)
        self.train_sets = {t: s["train"] for t, s in self.splits.items()}
        model_cfg.tasks = list(cfg.tasks)
        self.step = 0
        self.history: list[dict[str, float]] = []
        trainer_state = None
        if resume and (self.output / TRAINER_FILE).is_file():
            self.model = load_checkpoint(self.output, expect=model_cfg).train()
            trainer_state = torch.load(self.output / TRAINER_FILE, weights_only=True)
        elif cfg.init_from:
            self.model = load_checkpoint(cfg.init_from, expect=model_cfg).train()
        else:
            self.model = PHAModel(model_cfg)
        # How the weights this run starts from were made, oldest stage first: a staged model's checkpoint says
        # how every stage was trained, not only the last one.
        self.earlier_stages = earlier_stages(cfg.init_from) if cfg.init_from else []
        self.model.to(self.device).train()
        self.frozen = FrozenInLowPrecision(self.model, self.precision == "bf16")
        self.task_index = {t: i for i, t in enumerate(self.model.tasks)}
        self.label_weights = (
            label_weights(self.train_sets, lambda t: get_task(t).labels is not None) if cfg.balance_labels else None
        )
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, cfg.warmup, cfg.steps)
        self.mixer = ProportionalMixer(
            self.train_sets, cfg.batch_size, seed=cfg.seed + self.dist.rank, repeats=cfg.repeats
        )
        if trainer_state is not None:
            self._restore(trainer_state)
        self.ddp_model: nn.Module = self.model
        if self.dist.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.mixer.load_state_dict({"batches_drawn": int(state["batches_drawn"])})
        self.step = int(state["step"])
        history_file = self.output / "train_log.json"
        if history_file.is_file():
            self.history = json.loads(history_file.read_text())["history"]

    def train_step(self, examples: list[Example]) -> dict[str, float]:
        buckets = collate_buckets(
            self.model.backbone,
            examples,
            self.task_index,
            self.model.config.max_source_length,
            self.model.config.max_target_length,
            self.cfg.token_budget,
            self.model.config.by_field,
            self.label_weights,
        )
        with autocast(self.precision, self.device):
            parts = self.ddp_model([b.to(self.device) for b in buckets])
        parts.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**parts.as_floats(), "grad_norm": float(grad_norm)}

    def run(self, evaluate_fn=None) -> dict[str, Any]:
        """Train to `steps`, logging the loss parts; returns the history and final evaluation."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            disable=not (self.progress and self.dist.is_main),
            desc="pha train",
            dynamic_ncols=True,
        )
        window: list[dict[str, float]] = []
        started, seen = time.perf_counter(), 0
        while self.step < self.cfg.steps:
            window.append(self.train_step(next(self.mixer)))
            self.step += 1
            seen += self.cfg.batch_size * self.dist.world_size
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                row = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
                row.update(
                    step=self.step,
                    lr=self.scheduler.get_last_lr()[0],
                    examples_per_s=seen / (time.perf_counter() - started),
                )
                self.history.append(row)
                bar.set_postfix(
                    ce=f"{row['ce']:.3f}",
                    ir=f"{row['ir']:.3f}",
                    pro=f"{row['pro']:.3f}",
                    ex_s=f"{row['examples_per_s']:.1f}",
                )
                window = []
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and evaluate_fn:
                with self.frozen.paused():  # evaluate the float32 model a checkpoint would hold
                    self.history[-1]["validation"] = evaluate_fn(self.model, "validation")["average"]
                self.model.train()  # evaluation leaves the model in eval mode
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                self.save()
        bar.close()
        self.frozen.restore()
        if self.cfg.save_dtype != "float32":
            round_trainable(self.model, getattr(torch, self.cfg.save_dtype))
        self.save()
        return {"history": self.history, "train_seconds": time.perf_counter() - started}

    def save(self) -> None:
        if not self.dist.is_main:
            return
        recipe = {
            **asdict(self.cfg),
            # No machine path in a checkpoint (it ships): the output folder by name, a data folder only if relative.
            "output": Path(self.cfg.output).name,
            "data_dir": self.cfg.data_dir if self.cfg.data_dir and not Path(self.cfg.data_dir).is_absolute() else None,
            "steps_done": self.step,
            "train_sizes": {t: len(s) for t, s in self.train_sets.items()},
            "earlier_stages": self.earlier_stages,
        }
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "batches_drawn": self.mixer.batches_drawn,
        }
        dtype = getattr(torch, self.cfg.save_dtype) if self.step >= self.cfg.steps else None
        with self.frozen.paused():
            save_checkpoint(self.model, self.output, recipe=recipe, trainer_state=state, dtype=dtype)
        _write_json_atomic(self.output / "train_log.json", {"history": self.history})


def _write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def loss_trend(history: list[dict[str, float]], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last quarter of the logged rows."""
    if not history:
        return math.nan, math.nan
    q = max(1, len(history) // 4)
    first = [r[key] for r in history[:q]]
    last = [r[key] for r in history[-q:]]
    return sum(first) / len(first), sum(last) / len(last)


def recipe_of(checkpoint: str | Path) -> dict[str, Any]:
    return read_meta(checkpoint).get("recipe", {})


def earlier_stages(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The recipes that made `checkpoint`, oldest first: the stages before it, then its own."""
    recipe = dict(recipe_of(checkpoint))
    return [*recipe.pop("earlier_stages", []), recipe]
