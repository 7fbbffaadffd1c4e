"""Label priors (pha_core/label_prior.py): the CE fit, the file beside a checkpoint, and evaluation using them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pha_core.evaluate import predict_examples
from pha_core.label_prior import FILE, LabelPrior, fit_label_offsets, fit_label_prior, fit_temperature
from pha_core.model import PHAModel
from pha_core.tasks import Example
from tests.support.tiny import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PHAModel(tiny_config(tasks=["sst2", "mnli", "stsb"])).eval()


def rows(task: str, target: str, n: int) -> list[Example]:
    inputs = {"sst2": "sentence: a film number {i}", "mnli": "premise: a cat {i} sat. hypothesis: a cat sat."}
    return [Example(inputs[task].format(i=i), target, task) for i in range(n)]


def test_offsets_move_the_prior_onto_the_held_out_labels():
    loglik = torch.zeros(40, 3)  # a decoder with no preference at all
    gold = [0] * 30 + [1] * 10  # held-out rows: 75% / 25% / 0%
    b = fit_label_offsets(loglik, gold, l2=0.0)
    probs = torch.softmax(loglik[0] + torch.as_tensor(b), dim=0)
    assert probs[0] == pytest.approx(0.75, abs=0.02) and probs[1] == pytest.approx(0.25, abs=0.02)
    assert float(np.sum(b)) == pytest.approx(0.0, abs=1e-5)  # centred


def test_a_trained_models_label_tasks_get_one_offset_per_label_and_stsb_none(model):
    held_out = {"sst2": rows("sst2", "negative", 24), "mnli": rows("mnli", "contradiction", 24)}
    prior = fit_label_prior(model, {**held_out, "stsb": [Example("sentence1: a sentence2: b", "2.0", "stsb")]})
    assert set(prior.offsets) == {"sst2", "mnli"} and prior.rows == 48
    assert len(prior.of("sst2")) == 2 and len(prior.of("mnli")) == 3 and prior.of("stsb") is None
    # Every held-out row is one label: its offset is the largest, and evaluation with the prior answers it.
    assert np.argmax(prior.of("sst2")) == 0 and np.argmax(prior.of("mnli")) == 2
    given = predict_examples(model, held_out["mnli"], prior=prior)["given"]
    assert given.count("contradiction") > predict_examples(model, held_out["mnli"])["given"].count("contradiction")


def test_label_prior_files_round_trip_and_bad_ones_are_named(tmp_path):
    prior = LabelPrior({"sst2": (0.25, -0.25), "mnli": (0.1, 0.2, -0.3)}, rows=900, temperatures={"sst2": 1.7})
    prior.save(tmp_path)
    assert LabelPrior.load(tmp_path) == prior
    assert prior.temperature_of("sst2") == 1.7 and prior.temperature_of("mnli") == 1.0  # none fitted: 1
    assert LabelPrior.load(tmp_path / "none") is None
    (tmp_path / FILE).write_text(json.dumps({"offsets": {"sst2": ["x", 1]}, "rows": 3}))
    with pytest.raises(ValueError, match="pha calibrate"):
        LabelPrior.load(tmp_path)
    (tmp_path / FILE).write_text('{"offsets": {"sst2": [NaN, 1]}, "rows": 3}')
    with pytest.raises(ValueError, match="non-finite offsets for \\['sst2'\\]"):
        LabelPrior.load(tmp_path)
    (tmp_path / FILE).write_text(json.dumps({"offsets": {"sst2": [1, 0]}, "rows": 3, "temperatures": {"sst2": 0}}))
    with pytest.raises(ValueError, match="temperatures of \\['sst2'\\] are not in"):
        LabelPrior.load(tmp_path)
    # A file fitted before temperatures existed loads, with T = 1 for every task.
    (tmp_path / FILE).write_text(json.dumps({"offsets": {"sst2": [1, 0]}, "rows": 3}))
    assert LabelPrior.load(tmp_path).temperature_of("sst2") == 1.0


def test_a_temperature_fit_recovers_how_over_confident_the_scores_are():
    """Labels drawn from softmax(s / 2.5): the scores are 2.5 times too sharp, and the fit says so."""
    generator = torch.Generator().manual_seed(0)
    scores = 4 * torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    gold = torch.multinomial(torch.softmax(scores / 2.5, dim=1), 1, generator=generator)[:, 0].tolist()
    assert fit_temperature(scores, gold) == pytest.approx(2.5, rel=0.08)
    # Scores that already are the probabilities the labels follow: T stays near 1.
    gold = torch.multinomial(torch.softmax(scores, dim=1), 1, generator=generator)[:, 0].tolist()
    assert fit_temperature(scores, gold) == pytest.approx(1.0, rel=0.08)


def test_the_temperature_softens_the_probabilities_but_never_changes_an_answer(model):
    held_out = {"sst2": rows("sst2", "negative", 12) + rows("sst2", "positive", 12)}
    fitted = fit_label_prior(model, held_out)
    assert fitted.temperature_of("sst2") > 0 and set(fitted.temperatures) == {"sst2"}
    sharp = LabelPrior(fitted.offsets, fitted.rows, {"sst2": 0.2})
    soft = LabelPrior(fitted.offsets, fitted.rows, {"sst2": 5.0})
    examples = held_out["sst2"]
    assert (
        predict_examples(model, examples, prior=sharp)["given"]
        == predict_examples(model, examples, prior=soft)["given"]
    )
    from pha_core.label_prior import task_log_likelihoods
    from pha_core.scoring import answer

    loglik = task_log_likelihoods(model, "sst2", examples[:1])[0]
    top = {T: max(answer(p.space_of("sst2"), loglik).probabilities.values()) for T, p in [(0.2, sharp), (5, soft)]}
    assert 0.5 <= top[5] < top[0.2]
