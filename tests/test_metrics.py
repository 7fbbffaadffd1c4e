"""Metrics: hand-computed values, agreement with sklearn/scipy, and invalid outputs counted as wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from pha_core.metrics import (
    accuracy,
    f1,
    matthews_corrcoef,
    parse_score,
    pearson,
    score,
    spearman,
    task_metrics,
)

# ------------------------------------------------------------------------------------------- hand-computed


def test_hand_computed_values() -> None:
    pred, gold = [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    # tp=2 fp=1 fn=1 tn=2
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    assert f1(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties: [1, 2.5, 2.5, 4] against [1, 2, 3, 4]
    assert spearman([1, 5, 5, 9], [10, 20, 30, 40]) == pytest.approx(
        float(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    )


def test_degenerate_inputs_give_zero_not_nan() -> None:
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 0.0
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
    assert f1([0, 0], [0, 0]) == 0.0


def test_length_mismatch_and_empty_inputs() -> None:
    with pytest.raises(ValueError, match="2 predictions for 3 targets"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no examples"):
        pearson([], [])


# ------------------------------------------------------------------------------------ against sklearn/scipy


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_and_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, size=200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    assert f1(pred.tolist(), gold.tolist()) == pytest.approx(skm.f1_score(gold, pred))
    assert accuracy(pred.tolist(), gold.tolist()) == pytest.approx(skm.accuracy_score(gold, pred))
    assert matthews_corrcoef(pred.tolist(), gold.tolist()) == pytest.approx(skm.matthews_corrcoef(gold, pred))
    multi_gold, multi_pred = rng.integers(0, 3, size=150), rng.integers(-1, 3, size=150)
    assert matthews_corrcoef(multi_pred.tolist(), multi_gold.tolist()) == pytest.approx(
        skm.matthews_corrcoef(multi_gold, multi_pred)
    )
    x = rng.normal(size=300)
    y = 0.5 * x + rng.normal(size=300)
    assert pearson(x.tolist(), y.tolist()) == pytest.approx(stats.pearsonr(x, y)[0])
    tied_x, tied_y = np.round(x * 2) / 2, np.round(y)  # many ties
    assert spearman(tied_x.tolist(), tied_y.tolist()) == pytest.approx(stats.spearmanr(tied_x, tied_y)[0])


# -------------------------------------------------------------------------------------------- task metrics


def test_classification_task_metrics_on_label_words() -> None:
    targets = ["positive", "negative", "positive", "negative"]
    assert task_metrics("sst2", ["positive", "negative", "negative", "negative"], targets) == {"accuracy": 0.75}
    assert task_metrics("sst2", [" positive\n", "negative", "positive", "negative"], targets) == {"accuracy": 1.0}


def test_invalid_outputs_count_as_wrong() -> None:
    targets = ["entailment", "neutral", "contradiction"]
    assert task_metrics("mnli", ["entailment", "Neutral", "maybe"], targets)["accuracy"] == pytest.approx(1 / 3)
    # MRPC: an invalid output becomes the opposite of the target (T5's f1_score_with_invalid).
    gold = ["equivalent", "equivalent", "not_equivalent", "not_equivalent"]
    result = task_metrics("mrpc", ["equivalent", "???", "", "not_equivalent"], gold)
    # as ids: pred [1, 0, 1, 0] against gold [1, 1, 0, 0] -> tp=1 fp=1 fn=1
    assert result == {"f1": pytest.approx(0.5), "accuracy": pytest.approx(0.5)}
    # CoLA: all outputs invalid -> every one wrong -> MCC = -1, never 0 or better.
    cola_gold = ["acceptable", "unacceptable", "acceptable", "unacceptable"]
    assert task_metrics("cola", ["yes"] * 4, cola_gold) == {"mcc": pytest.approx(-1.0)}
    assert task_metrics("cola", cola_gold, cola_gold) == {"mcc": pytest.approx(1.0)}


def test_qqp_f1_matches_sklearn_with_invalid_outputs() -> None:
    rng = np.random.default_rng(0)
    words = ("not_duplicate", "duplicate")
    gold_ids = rng.integers(0, 2, size=100)
    pred_ids = rng.integers(-1, 2, size=100)  # -1: an invalid output
    preds = [words[p] if p >= 0 else "dup" for p in pred_ids]
    forced = np.where(pred_ids >= 0, pred_ids, 1 - gold_ids)
    result = task_metrics("qqp", preds, [words[g] for g in gold_ids])
    assert result["f1"] == pytest.approx(skm.f1_score(gold_ids, forced))
    assert result["accuracy"] == pytest.approx(float(np.mean(pred_ids == gold_ids)))


def test_stsb_task_metrics_and_unparsable_outputs() -> None:
    targets = ["0.0", "1.2", "3.8", "5.0"]
    assert task_metrics("stsb", targets, targets) == {
        "pearson": pytest.approx(1.0),
        "spearman": pytest.approx(1.0),
    }
    preds = ["0.4", "one", "3.6", "nan"]
    expected_x = [0.4, -1.0, 3.6, -1.0]
    expected_y = [0.0, 1.2, 3.8, 5.0]
    result = task_metrics("stsb", preds, targets)
    assert result["pearson"] == pytest.approx(stats.pearsonr(expected_x, expected_y)[0])
    assert result["spearman"] == pytest.approx(stats.spearmanr(expected_x, expected_y)[0])
    assert parse_score(" 2.4 ") == 2.4 and parse_score("inf") == -1.0


def test_bad_targets_are_errors_not_model_mistakes() -> None:
    with pytest.raises(ValueError, match="target"):
        task_metrics("sst2", ["positive"], ["great"])
    with pytest.raises(ValueError, match="not a number"):
        task_metrics("stsb", ["1.0"], ["high"])
    with pytest.raises(ValueError):
        task_metrics("sst2", ["positive"], ["positive", "negative"])


def test_score_is_the_mean_of_the_task_metrics() -> None:
    assert score("mrpc", {"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    assert score("stsb", {"pearson": 0.88, "spearman": 0.86, "extra": 5.0}) == pytest.approx(0.87)
    assert score("cola", {"mcc": 0.5}) == 0.5
    with pytest.raises(KeyError, match="accuracy"):
        score("rte", {"f1": 0.5})
