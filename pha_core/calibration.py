"""Calibrated routing: when the nearest prototype (Eq. 10) is the right task, and when no task fits.

The cosine of Eq. 10 is not a probability, and its scale differs per task: on the demo's validation rows the
median cosine of a row to its own task's key is 0.63 for MRPC and 0.90 for QNLI, its interquartile range 0.005
for QNLI and 0.30 for STS-B. So two numbers are fitted on held-out rows (validation rows when a model is trained,
the k examples when a task is adapted) and kept with the model:

- typicality: how usual the input's cosine is for the task it was routed to. Each task keeps a `Spread` (the
  median and interquartile range of its held-out rows' cosines, 8 bytes); cosines are standardised by it, and
  the model keeps the distribution of the standardised held-out cosines of all its tasks (`quantiles`), pooled
  so that a task adapted from 16 examples borrows the tail shape of tasks with hundreds. typicality(t, c) is the
  share of held-out rows whose standardised cosine is at most c's: a conformal p-value (about uniform for
  inputs like the task's own rows), so "typicality < 0.02" turns away about 2% of them and, measured on the
  demo (bench/routing.py), most inputs of no task's kind.
- confidence: P(the routed task is the input's task | margin to the runner-up), a logistic fit on held-out
  rows of the trained tasks (Platt scaling of the margin).

Neither changes the route itself: Eq. 10 stays `retriever.retrieve`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .files import write_atomic
from .tasks import Example, templates_of

# Levels of the pooled standardised-cosine distribution that are kept: dense in the lower tail, where the
# abstention threshold lies (0.5%..10%), coarse above it. 16 floats per model.
LEVELS = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
# Smallest spread scale: a task whose few held-out cosines nearly coincide (k examples the key was fitted to)
# must not turn away every new row that differs by a rounding error. 0.005 is the tightest trained task's IQR.
MIN_SCALE = 0.005
FILE = "calibration.json"


@dataclass(frozen=True, slots=True)
class Spread:
    """Where a task's held-out cosines to its key lie: median and interquartile range (slots: a replica holds
    one per task, up to a million)."""

    center: float
    scale: float

    @classmethod
    def of(cls, cosines: Sequence[float]) -> Spread:
        c = np.asarray(cosines, dtype=np.float64)
        if c.size == 0 or not np.all(np.isfinite(c)):
            raise ValueError("a spread needs at least one finite cosine")
        q1, median, q3 = np.quantile(c, [0.25, 0.5, 0.75])
        return cls(center=float(median), scale=max(float(q3 - q1), MIN_SCALE))

    def standardise(self, cosine: float) -> float:
        return (cosine - self.center) / self.scale


@dataclass(frozen=True)
class RouteCalibration:
    """What a model keeps to turn a route's (cosine, margin) into typicality and confidence."""

    quantiles: tuple[float, ...]  # pooled standardised held-out cosines at LEVELS
    slope: float  # confidence = sigmoid(intercept + slope * margin)
    intercept: float
    spreads: dict[str, Spread] = field(default_factory=dict)  # trained tasks
    rows: int = 0  # held-out rows fitted on

    def typicality(self, spread: Spread, cosine: float) -> float:
        """Share of held-out rows at most as typical as `cosine` is for a task with `spread` (0..1)."""
        return float(np.interp(spread.standardise(cosine), self.quantiles, LEVELS, left=0.0, right=1.0))

    def confidence(self, margin: float | None) -> float | None:
        """P(route right) from the margin; None when there was no runner-up to compare with."""
        if margin is None or not math.isfinite(margin):
            return None
        return 1.0 / (1.0 + math.exp(-(self.intercept + self.slope * margin)))

    # ------------------------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        text = json.dumps(asdict(self), indent=1)
        write_atomic(path, lambda tmp: tmp.write_text(text))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RouteCalibration | None:
        """The calibration stored with a checkpoint, or None when it has none (fitted before calibration)."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            spreads = {name: Spread(**s) for name, s in data.pop("spreads").items()}
            calibration = cls(**{**data, "quantiles": tuple(data["quantiles"]), "spreads": spreads})
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path} is not a valid route calibration ({exc}); refit it with `pha calibrate`") from exc
        if len(calibration.quantiles) != len(LEVELS):
            raise ValueError(f"{path} has {len(calibration.quantiles)} quantiles, expected {len(LEVELS)}")
        return calibration


def fit_calibration(
    own_cosines: np.ndarray, tasks: Sequence[str], margins: np.ndarray, correct: np.ndarray
) -> RouteCalibration:
    """Fit on held-out rows: each row's cosine to its own task's key, its task, and its route's margin and
    whether that route was right."""
    own = np.asarray(own_cosines, dtype=np.float64)
    names = np.asarray(tasks)
    if own.size == 0 or own.size != names.size:
        raise ValueError("calibration needs held-out rows, one task per cosine")
    spreads = {str(t): Spread.of(own[names == t]) for t in dict.fromkeys(names.tolist())}
    standard = np.array([spreads[str(t)].standardise(c) for c, t in zip(own, names, strict=True)])
    quantiles = tuple(float(q) for q in np.maximum.accumulate(np.quantile(standard, LEVELS)))
    intercept, slope = _platt(np.asarray(margins, dtype=np.float64), np.asarray(correct, dtype=np.float64))
    return RouteCalibration(quantiles, slope=slope, intercept=intercept, spreads=spreads, rows=int(own.size))


def _platt(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iterations: int = 100) -> tuple[float, float]:
    """Logistic regression of y on x by Newton's method, a light L2 on the slope (perfectly separable held-out
    rows would send it to infinity; margins are ~0.01-0.5, so slopes of tens are ordinary and barely touched);
    rows with a NaN margin (one candidate) are left out."""
    keep = np.isfinite(x)
    x, y = x[keep], y[keep]
    if x.size == 0 or y.min() == y.max():  # nothing to separate: a constant probability
        rate = float(y.mean()) if y.size else 0.5
        rate = min(max(rate, 1e-3), 1 - 1e-3)
        return math.log(rate / (1 - rate)), 0.0
    design = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    penalty = np.diag([0.0, l2])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-design @ w))
        grad = design.T @ (p - y) + penalty @ w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def calibrate(model, splits: Mapping[str, Sequence[Example]], batch_size: int = 64) -> RouteCalibration:
    """Fit a trained model's calibration on held-out rows of its tasks ({task: examples}, validation rows)."""
    import torch

    from .retriever import cosine_scores
    from .source import candidates_by_template

    if not model.config.routes_by_prototype:
        raise ValueError(f"variant {model.config.variant!r} does not route, so it has no route calibration")
    rows = [e for task in model.tasks for e in splits.get(task, ())]
    if not rows:
        raise ValueError(f"no held-out rows of the model's tasks {model.tasks}")
    templates = templates_of(model.tasks)
    keys = model.prototypes.weight.detach()
    own, margins, correct = [], [], []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            gold = model.task_ids([e.task for e in chunk])
            hidden, mask = model.encode(model.source([e.input for e in chunk]), gold)
            z = model.instance_vectors(hidden, mask)
            own += cosine_scores(z, keys).gather(1, gold.view(-1, 1)).squeeze(1).tolist()
            found = model.retrieve(z, allowed=candidates_by_template([e.input for e in chunk], templates).to(z.device))
            margins += found.margin.tolist()
            correct += (found.indices[:, 0] == gold).tolist()
    return fit_calibration(np.array(own), [e.task for e in rows], np.array(margins), np.array(correct, dtype=float))
