"""Label priors: one offset per label, added to its log-likelihood before the softmax (scoring.AnswerSpace).

Rank classification (scoring.py) reads P(label | x) off the decoder, and what the decoder learned of each
label's prior comes from the training mix, not from the task: up-sampled rows, balanced label weights
(recipes `repeat`, `balance_labels`) and the other tasks in the batch all move it. One offset per label, fitted
by cross-entropy on held-out rows the model never trained on, puts the prior back where the task's rows have it
(Platt-style prior correction; adding a constant changes nothing, so the offsets are centred). Two places fit
them: an adapted task on its k examples (adapt.py), a trained model's tasks on their validation rows at the end
of `pha train` or by `pha calibrate`, kept beside the checkpoint in label_prior.json. Measured on the demo
(docs/results.md section 2): test GLUE average of the seven label tasks 0.670 -> 0.676, CoLA MCC 0.186 -> 0.220.
STS-B's bins get none: its answer is an expectation, and Pearson ignores a shift of it.

An offset moves the prior, not the sharpness: the decoder trained to CE near 0 on its rows is over-confident
(the demo's CoLA answers carry 0.9 where 0.66 of them are right). A trained task also gets a temperature T,
fitted by CE on the same rows after its offsets (temperature scaling, Guo et al. 2017): P = softmax((loglik +
b) / T). Dividing by T > 0 never changes which label wins, so every answer and every metric stay as they were;
only the probabilities move (demo, test rows: mean ECE 0.100 -> 0.041, log-loss 0.611 -> 0.546,
bench/label_prior.py). An adapted task keeps T = 1: its k examples are the rows its adapters were fitted on,
and a temperature fitted there would measure how well it memorised them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic
from .scoring import TEMPERATURE_BOUNDS, AnswerSpace, candidate_ids, label_log_likelihoods
from .tasks import Example

FILE = "label_prior.json"
# L2 weight on the offsets: with 16 examples of 2-3 labels the unregularised fit can run off to a one-label
# answer; 0.01 kept BoolQ/CB's fits and barely moved the held-out figures (scratch sweep 0 / 0.01 / 0.1). With
# a trained task's hundreds of validation rows it is negligible.
OFFSET_L2 = 0.01


def fit_label_offsets(loglik: torch.Tensor, gold: Sequence[int], l2: float = OFFSET_L2) -> np.ndarray:
    """Offsets b [L] minimising the mean CE of softmax(loglik + b) on the examples (loglik [n, L], gold the
    label index of each) + l2 |b|^2, centred (adding a constant changes no probability). Convex: L-BFGS."""
    scores = loglik.detach().double().cpu()
    target = torch.as_tensor(list(gold), dtype=torch.long)
    b = torch.zeros(scores.size(1), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores + b, target) + l2 * (b**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    b = b.detach()
    return (b - b.mean()).numpy().astype(np.float32)


def fit_temperature(scores: torch.Tensor, gold: Sequence[int]) -> float:
    """T minimising the mean CE of softmax(scores / T) on the examples (scores [n, L] with the offsets already
    added, gold the label index of each), within the bounds a served temperature may take (scoring.py). One
    parameter, fitted in log T: L-BFGS."""
    values = scores.detach().double().cpu()
    target = torch.as_tensor(list(gold), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(values * torch.exp(-log_t), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_BOUNDS
    return float(min(max(math.exp(float(log_t.detach())), low), high))


@dataclass(frozen=True)
class LabelPrior:
    """The fitted offsets of a trained model's label tasks ({task: one per label, in the task's label order}) and
    their temperatures ({task: T}; a task without one has T = 1)."""

    offsets: dict[str, tuple[float, ...]] = field(default_factory=dict)
    rows: int = 0  # held-out rows they were fitted on
    temperatures: dict[str, float] = field(default_factory=dict)

    def of(self, task: str) -> tuple[float, ...] | None:
        return self.offsets.get(task)

    def temperature_of(self, task: str) -> float:
        return self.temperatures.get(task, 1.0)

    def space_of(self, task: str) -> AnswerSpace | None:
        """The task's answer space with its offsets and temperature, as evaluation and the server score it."""
        return AnswerSpace.of_task(task, self.of(task), self.temperature_of(task))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        body = {"offsets": {t: list(v) for t, v in self.offsets.items()}, "rows": self.rows}
        text = json.dumps(body | {"temperatures": self.temperatures}, indent=1)
        write_atomic(path, lambda tmp: tmp.write_text(text))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LabelPrior | None:
        """The prior stored with a checkpoint, or None when it has none (fitted before label priors existed)."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            offsets = {str(t): tuple(float(x) for x in v) for t, v in data["offsets"].items()}
            # Files fitted before temperatures existed have none: their tasks keep T = 1.
            temperatures = {str(t): float(v) for t, v in data.get("temperatures", {}).items()}
            prior = cls(offsets, int(data["rows"]), temperatures)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path} is not a valid label prior ({exc}); refit it with `pha calibrate`") from exc
        bad = [t for t, v in prior.offsets.items() if not np.all(np.isfinite(v))]
        if bad:
            raise ValueError(f"{path}: non-finite offsets for {bad}; refit it with `pha calibrate`")
        low, high = TEMPERATURE_BOUNDS
        bad = [t for t, v in prior.temperatures.items() if not low <= v <= high]
        if bad:
            raise ValueError(f"{path}: temperatures of {bad} are not in [{low}, {high}]; refit it with `pha calibrate`")
        return prior


@torch.inference_mode()
def task_log_likelihoods(model, task: str, examples: Sequence[Example], batch_size: int = 64) -> torch.Tensor:
    """Every label's log-likelihood [n, L] for rows of one label task, with the task given (its own adapters),
    before any offset: what the prior is fitted on."""
    ids, loglik = candidate_ids(model.backbone, AnswerSpace.of_task(task)), []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        gold = model.task_ids([task] * len(chunk))
        hidden, mask = model.encode(model.source([e.input for e in chunk]), gold)
        z = model.instance_vectors(hidden, mask) if model.retriever is not None else None
        loglik += label_log_likelihoods(model, hidden, mask, model.decoder_adapters(gold, z), [ids] * len(chunk))
    return torch.stack(loglik).double()


def fit_label_prior(model, splits: Mapping[str, Sequence[Example]], batch_size: int = 64) -> LabelPrior:
    """Offsets, then a temperature, for every label task of a trained model, fitted on its held-out rows ({task:
    examples}) scored with the task given, as `pha eval` and the server score them."""
    model.eval()
    offsets, temperatures, rows = {}, {}, 0
    for task in model.tasks:
        space, examples = AnswerSpace.of_task(task), list(splits.get(task, ()))
        if space is None or space.regression or not examples:
            continue
        loglik = task_log_likelihoods(model, task, examples, batch_size)
        unknown = sorted({e.target for e in examples} - set(space.words))
        if unknown:
            raise ValueError(f"{task}: held-out targets {unknown} are not among its labels {list(space.words)}")
        gold_labels = [space.words.index(e.target) for e in examples]
        fitted = fit_label_offsets(loglik, gold_labels)
        offsets[task] = tuple(float(x) for x in fitted)
        temperatures[task] = fit_temperature(loglik + torch.as_tensor(fitted, dtype=loglik.dtype), gold_labels)
        rows += len(examples)
    return LabelPrior(offsets, rows, temperatures)
