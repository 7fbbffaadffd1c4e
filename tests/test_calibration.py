"""Route calibration (pha_core/calibration.py): typicality as a conformal p-value, Platt confidence, files;
and the routing candidates of a text (its template), as evaluation and the server narrow them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pha_core.calibration import FILE, LEVELS, MIN_SCALE, RouteCalibration, Spread, fit_calibration
from pha_core.retriever import retrieve
from pha_core.source import candidates_by_template
from pha_core.tasks import get_task


def held_out(seed: int = 0):
    """Two tasks whose cosines sit at different places and scales, as trained tasks' do."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.90, 0.005, 400), rng.normal(0.60, 0.10, 400)
    margins = rng.uniform(0, 0.4, 800)
    correct = rng.uniform(size=800) < 1 / (1 + np.exp(-(20 * margins - 1)))  # more margin, more often right
    return np.concatenate([a, b]), ["qnli"] * 400 + ["stsb"] * 400, margins, correct


def test_spread_is_median_and_iqr_with_a_floor():
    s = Spread.of([0.1, 0.2, 0.3, 0.4, 0.5])
    assert s.center == pytest.approx(0.3) and s.scale == pytest.approx(0.2)
    assert Spread.of([0.7, 0.7, 0.7]).scale == MIN_SCALE
    with pytest.raises(ValueError, match="finite"):
        Spread.of([])


def test_typicality_is_about_uniform_on_fresh_rows_of_each_task():
    calibration = fit_calibration(*held_out(0))
    own, tasks, _, _ = held_out(1)  # new rows from the same tasks
    typ = np.array([calibration.typicality(calibration.spreads[t], c) for c, t in zip(own, tasks, strict=True)])
    for level in (0.02, 0.1, 0.5):
        assert abs((typ < level).mean() - level) < 0.03 + level * 0.5
    # Per task too: a global cosine threshold would turn away all of stsb before any of qnli.
    names = np.array(tasks)
    assert 0.0 < (typ[names == "stsb"] < 0.1).mean() < 0.2 and 0.0 < (typ[names == "qnli"] < 0.1).mean() < 0.2
    # A cosine far below a task's spread is untypical of it, one at its median is typical.
    assert calibration.typicality(calibration.spreads["qnli"], 0.80) == 0.0
    assert calibration.typicality(calibration.spreads["qnli"], 0.90) == pytest.approx(0.5, abs=0.05)


def test_confidence_grows_with_the_margin_and_is_none_without_a_runner_up():
    calibration = fit_calibration(*held_out(0))
    low, high = calibration.confidence(0.0), calibration.confidence(0.3)
    assert 0.0 < low < 0.5 < high < 1.0 and calibration.slope > 0
    assert calibration.confidence(None) is None and calibration.confidence(float("nan")) is None
    own, tasks, margins, _ = held_out(0)
    always = fit_calibration(own, tasks, margins, np.ones_like(margins))  # nothing to separate
    assert always.slope == 0.0 and always.confidence(0.0) > 0.99


def test_calibration_files_round_trip_and_bad_ones_are_named(tmp_path):
    calibration = fit_calibration(*held_out(0))
    calibration.save(tmp_path)
    assert RouteCalibration.load(tmp_path) == calibration
    assert RouteCalibration.load(tmp_path / "none") is None
    data = json.loads((tmp_path / FILE).read_text())
    data["quantiles"] = data["quantiles"][:3]
    (tmp_path / FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{len(LEVELS)}"):
        RouteCalibration.load(tmp_path)
    (tmp_path / FILE).write_text("{not json")
    with pytest.raises(ValueError, match="pha calibrate"):
        RouteCalibration.load(tmp_path)


def test_a_text_is_a_candidate_of_the_tasks_written_as_it_is():
    templates = [get_task("sst2").template, get_task("stsb").template, get_task("qnli").template, None]
    texts = [
        "sentence: a fine film",
        "sentence1: As per your question: yes. sentence2: text: it is",  # markers inside values
        "question: why? sentence: because.",
        "hello world",
    ]
    allowed = candidates_by_template(texts, templates).tolist()
    assert allowed == [
        [True, False, False, True],
        [False, True, False, True],
        [False, False, True, True],
        [False, False, False, True],  # only the task without a template takes a text written as none is
    ]


def test_retrieval_among_allowed_prototypes():
    keys = torch.eye(3)
    z = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.9, 0.0]])
    allowed = torch.tensor([[True, True, True], [False, True, True]])
    found = retrieve(z, keys, top_k=1, allowed=allowed)
    assert found.indices[:, 0].tolist() == [0, 1]
    assert found.margin[0] > 0 and found.margin[1] == pytest.approx(found.scores[1, 0].item())
    only = retrieve(z[:1], keys, allowed=torch.tensor([[False, True, False]]))
    assert only.indices[0, 0] == 1 and torch.isnan(only.margin[0])
    with pytest.raises(LookupError):
        retrieve(z[:1], keys, allowed=torch.tensor([[False, False, False]]))
