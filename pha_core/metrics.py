"""Task metrics on generated label words (scikit-learn and SciPy compute them).

All metrics are fractions in [0, 1] ([-1, 1] for correlations), never percentages: multiply by 100 only when
printing a table. An output that is not a valid label counts as wrong (pha-method.md section 5):
  - accuracy: an invalid output never equals a target;
  - F1 and MCC (binary tasks): an invalid output is replaced by the label opposite to the target, as T5's
    ``f1_score_with_invalid`` does, so it is always a false positive or a false negative;
  - STS-B: an output that does not parse as a finite float becomes -1.0, outside the 0-5 scale, so it is never
    right (0.0 would be exactly right on a "0.0" target). This is also T5's ``string_to_float`` default.
Predictions are compared after ``str.strip()``; nothing else (case, punctuation) is forgiven.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as sklearn_metrics

from pha_core.tasks import get_task

INVALID_SCORE = -1.0


def _arrays(predictions: Sequence[object], targets: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if len(targets) == 0:
        raise ValueError("no examples to score")
    return np.asarray(predictions), np.asarray(targets)


def accuracy(predictions: Sequence[object], targets: Sequence[object]) -> float:
    """Fraction of exact matches."""
    pred, gold = _arrays(predictions, targets)
    return float(np.mean(pred == gold))


def f1(predictions: Sequence[int], targets: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class; 0.0 when there is no positive in either."""
    pred, gold = _arrays(predictions, targets)
    # labels=[positive] scores that class alone, whatever other labels (or none) the arrays hold.
    return float(sklearn_metrics.f1_score(gold, pred, labels=[positive], average="macro", zero_division=0.0))


def matthews_corrcoef(predictions: Sequence[object], targets: Sequence[object]) -> float:
    """Matthews correlation, multi-class form (Gorodkin's R_K); 0.0 when undefined (one class on a side)."""
    pred, gold = _arrays(predictions, targets)
    return float(sklearn_metrics.matthews_corrcoef(gold, pred))


def _correlation(kind: Callable[..., Any], x: Sequence[float], y: Sequence[float]) -> float:
    a, b = (arr.astype(np.float64) for arr in _arrays(x, y))
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # undefined (scipy gives nan): a constant predictor correlates with nothing
        return 0.0
    return float(kind(a, b).statistic)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    return _correlation(stats.pearsonr, x, y)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman correlation (ties share their mean rank); 0.0 when either side is constant."""
    return _correlation(stats.spearmanr, x, y)


def parse_score(text: str) -> float:
    """An STS-B output as a float, or INVALID_SCORE (-1.0) when it is not a finite number."""
    try:
        value = float(text.strip())
    except ValueError:
        return INVALID_SCORE
    return value if math.isfinite(value) else INVALID_SCORE


def task_metrics(task: str, predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """The task's metrics (TaskSpec.metrics) computed on generated texts against target texts.

    Targets must be valid (a bad target is a bug upstream, not a model error): ValueError otherwise.
    """
    spec = get_task(task)
    _arrays(predictions, targets)
    if spec.labels is None:
        gold = [parse_score(t) for t in targets]
        if INVALID_SCORE in gold:
            raise ValueError(f"{task}: a target is not a number: {targets[gold.index(INVALID_SCORE)]!r}")
        scores = [parse_score(p) for p in predictions]
        return {name: _REGRESSION[name](scores, gold) for name in spec.metrics}
    index = {word: i for i, word in enumerate(spec.labels)}
    bad = [t for t in targets if t.strip() not in index]
    if bad:
        raise ValueError(f"{task}: target {bad[0]!r} is not one of {list(spec.labels)}")
    gold_ids = [index[t.strip()] for t in targets]
    pred_ids = [index.get(p.strip(), -1) for p in predictions]
    return {name: _classification_metric(name, pred_ids, gold_ids, len(spec.labels)) for name in spec.metrics}


def _classification_metric(name: str, pred: list[int], gold: list[int], n_labels: int) -> float:
    if name == "accuracy":
        return accuracy(pred, gold)  # -1 (invalid) never equals a label id
    if n_labels != 2:
        raise ValueError(f"metric {name!r} is defined here for binary tasks only")
    forced_wrong = [p if p >= 0 else 1 - g for p, g in zip(pred, gold, strict=True)]
    if name == "f1":
        return f1(forced_wrong, gold, positive=1)
    if name == "mcc":
        return matthews_corrcoef(forced_wrong, gold)
    raise ValueError(f"unknown classification metric {name!r}")


_REGRESSION: Mapping[str, Callable[[Sequence[float], Sequence[float]], float]] = MappingProxyType(
    {"pearson": pearson, "spearman": spearman}
)


def score(task: str, metrics: Mapping[str, float]) -> float:
    """The one figure per task for averages: the mean of the task's own metrics (Hyperformer's convention).

    E.g. MRPC = (F1 + accuracy) / 2, STS-B = (Pearson + Spearman) / 2, CoLA = MCC. Extra keys are ignored.
    """
    names = get_task(task).metrics
    missing = [name for name in names if name not in metrics]
    if missing:
        raise KeyError(f"{task}: metrics lack {missing}")
    return float(sum(metrics[name] for name in names) / len(names))
