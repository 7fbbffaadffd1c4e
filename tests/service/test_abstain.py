"""Routing that knows when no task fits: the calibration's typicality over HTTP, and the three policies."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pha_core.calibration import LEVELS, RouteCalibration, Spread
from tests.support.app import metric, predictions, running_app

RTE = "sentence1: The cat sat on the mat. sentence2: A cat is sitting."
SST2 = "sentence: a gripping and beautiful film"


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a calibration under which every route to sst2 is untypical (its held-out
    cosines sat far above any cosine) and every route to rte typical (far below)."""
    path = tmp_path_factory.mktemp("calibrated") / "tiny"
    shutil.copytree(tiny_checkpoint, path)
    spreads = {"sst2": Spread(center=5.0, scale=0.01), "rte": Spread(center=-5.0, scale=0.01)}
    quantiles = tuple(float(x) for x in range(-len(LEVELS) // 2, len(LEVELS) - len(LEVELS) // 2))
    RouteCalibration(quantiles, slope=10.0, intercept=0.0, spreads=spreads, rows=100).save(path)
    return path


def test_abstains_when_the_input_is_untypical_of_its_nearest_task(calibrated):
    with running_app(calibrated) as client:
        untypical, typical = predictions(client, inputs=[SST2, RTE])
        assert untypical["output"] is None and untypical["probabilities"] is None
        assert untypical["route"]["task"] == "sst2" and untypical["route"]["fits"] is False
        assert untypical["route"]["typicality"] == 0.0 and "typicality" in untypical["route"]["reason"]
        assert untypical["low_confidence"] is True
        assert typical["output"] in ("entailment", "not_entailment") and typical["route"]["fits"] is True
        assert typical["route"]["typicality"] == 1.0 and typical["route"]["reason"] is None
        assert metric(client, "pha_no_task_fits_total", why="typicality") == 1.0
        (pinned,) = predictions(client, inputs=SST2, task="sst2")  # a named task is never second-guessed
        assert pinned["output"] in ("negative", "positive") and pinned["route"]["typicality"] is None
        assert client.get("/prototypes/sst2").json()["spread"] == [5.0, 0.01]


def test_refuse_policy_answers_422_and_flag_policy_serves_anyway(calibrated):
    with running_app(calibrated, no_fit_action="refuse") as client:
        response = client.post("/predict", json={"inputs": [RTE, SST2]})
        assert response.status_code == 422 and "no task fits" in response.json()["detail"]
        assert client.post("/predict", json={"inputs": "hello world"}).status_code == 422
        assert predictions(client, inputs=RTE)[0]["route"]["fits"] is True
    with running_app(calibrated, no_fit_action="flag") as client:
        (flagged,) = predictions(client, inputs=SST2)
        assert flagged["output"] in ("negative", "positive") and flagged["route"]["fits"] is False
        assert flagged["low_confidence"] is True
        (anywhere,) = predictions(client, inputs="hello world")  # routed among every task, flagged
        assert anywhere["output"] is not None and anywhere["route"]["candidates"] == 3


def test_a_threshold_of_zero_turns_nothing_away(calibrated):
    with running_app(calibrated, min_route_typicality=0.0) as client:
        (p,) = predictions(client, inputs=SST2)
        assert p["output"] in ("negative", "positive") and p["route"]["fits"] is True


@pytest.fixture(scope="module")
def content_checked(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with every route cosine typical, and content banks under which the SST-2 text is
    unlike every sst2 training text (its bank is the text's opposite) and the RTE text like rte's (itself)."""
    from pha_core.checkpoint import load_checkpoint
    from pha_core.content import ContentBank, TaskBank, embed_texts

    path = tmp_path_factory.mktemp("content") / "tiny"
    shutil.copytree(tiny_checkpoint, path)
    spreads = {"sst2": Spread(center=-5.0, scale=0.01), "rte": Spread(center=-5.0, scale=0.01)}
    quantiles = tuple(float(x) for x in range(-len(LEVELS) // 2, len(LEVELS) - len(LEVELS) // 2))
    RouteCalibration(quantiles, slope=10.0, intercept=0.0, spreads=spreads, rows=100).save(path)
    sst2, rte = embed_texts(load_checkpoint(path).eval(), [SST2, RTE])
    levels = np.linspace(-0.9, 0.9, len(LEVELS))
    ContentBank({"sst2": TaskBank(-sst2[None, :], levels), "rte": TaskBank(rte[None, :], levels)}).save(path)
    return path


def test_the_content_check_turns_away_a_text_unlike_its_tasks_training_texts(content_checked):
    with running_app(content_checked) as client:
        unlike, like = predictions(client, inputs=[SST2, RTE])
        assert unlike["output"] is None and unlike["route"]["fits"] is False
        assert unlike["route"]["typicality"] == 0.0 and "training texts" in unlike["route"]["reason"]
        assert like["output"] in ("entailment", "not_entailment") and like["route"]["fits"] is True
        assert like["route"]["typicality"] == 1.0
        assert metric(client, "pha_no_task_fits_total", why="content") == 1.0
        assert metric(client, "pha_no_task_fits_total", why="typicality") == 0.0
        (pinned,) = predictions(client, inputs=SST2, task="sst2")  # a named task is never second-guessed
        assert pinned["output"] in ("negative", "positive")
