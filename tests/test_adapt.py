"""Few-shot adaptation (pha_core/adapt.py): nothing that exists changes, the new task learns and routes."""

import numpy as np
import pytest
import torch

from pha_core.adapt import (
    AdaptedTensors,
    _encode,
    adapt_task,
    adapted_adapters,
    choose_source,
    score_adapted,
    vectors_of_many,
)
from pha_core.adapters import AdapterWeights
from pha_core.model import PHAModel
from pha_core.scoring import AnswerSpace, rank
from pha_core.tasks import Example
from tests.support.tiny import tiny_config

SHOTS = [
    Example("premise: the dog barks. hypothesis: an animal makes noise.", "entailment", "cb"),
    Example("premise: it is sunny. hypothesis: it is raining.", "contradiction", "cb"),
    Example("premise: she left. hypothesis: she was tired.", "neutral", "cb"),
    Example("premise: two men run. hypothesis: people move.", "entailment", "cb"),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PHAModel(tiny_config()).eval()


def _protos(model):
    return model.prototypes.weight.detach().numpy().copy()


@pytest.mark.parametrize("mode", ["prototype", "adapter", "scratch"])
def test_adaptation_learns_routes_and_changes_nothing_else(model, mode):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt_task(model, SHOTS, _protos(model), model.tasks, mode=mode, steps=60, seed=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "adaptation changed the served model"
    assert all(p.grad is None for p in model.parameters()), "adaptation wrote gradients into the model"
    assert result.final_loss < result.losses[0]
    assert result.source_task in model.tasks and -1.0 <= result.source_score <= 1.0
    assert (result.adapters is None) == (mode == "prototype")
    scores = score_adapted(model, result, SHOTS, _protos(model))
    assert scores["routed_to_new"] == 1.0  # the key learnt to attract the task's own inputs


def test_same_seed_gives_the_same_result(model):
    a = adapt_task(model, SHOTS, _protos(model), model.tasks, steps=5, seed=3)
    b = adapt_task(model, SHOTS, _protos(model), model.tasks, steps=5, seed=3)
    assert np.array_equal(a.prototype, b.prototype) and np.array_equal(a.key, b.key)


def test_adapted_adapters_in_prototype_mode_come_from_the_hypernetwork(model):
    result = adapt_task(model, SHOTS, _protos(model), model.tasks, steps=2)
    adapters = adapted_adapters(model, result)
    with torch.no_grad():
        direct = model.adapters_from_condition(torch.as_tensor(result.prototype).view(1, -1))
    assert torch.equal(adapters.layers[0].w_up, direct[0].w_up)


def test_source_is_the_prototype_with_the_best_mean_cosine():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.2]])
    prototypes = torch.tensor([[0.0, 1.0], [1.0, 0.1], [-1.0, 0.0]])
    best, score = choose_source(z, prototypes)
    assert best == 1 and 0.9 < score <= 1.0


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="mode"):
        adapt_task(model, SHOTS, _protos(model), model.tasks, mode="magic")
    with pytest.raises(ValueError, match="at least one example"):
        adapt_task(model, [], _protos(model), model.tasks)


def test_label_offsets_fit_the_examples_prior():
    from pha_core.label_prior import fit_label_offsets

    # Every example prefers label 0 by 2 nats, but three of four are label 1: the fitted prior moves them over.
    loglik = torch.tensor([[0.0, -2.0]] * 4)
    offsets = fit_label_offsets(loglik, [1, 1, 1, 0], l2=0.0)
    assert offsets.sum() == pytest.approx(0.0, abs=1e-6)  # centred: a constant changes no probability
    p = torch.softmax(loglik[0] + torch.as_tensor(offsets), dim=0)
    assert float(p[1]) == pytest.approx(0.75, abs=1e-3)  # the examples' share of label 1
    assert abs(float(fit_label_offsets(loglik, [1, 1, 1, 0], l2=1.0)[1])) < abs(float(offsets[1]))  # shrunk


def test_adaptation_with_labels_serves_its_fitted_prior(model):
    labels = sorted({e.target for e in SHOTS})
    result = adapt_task(model, SHOTS, _protos(model), model.tasks, steps=5, seed=0, labels=labels)
    space = result.answers
    assert space.words == tuple(labels) and space.offsets is not None and len(space.offsets) == len(labels)
    assert adapt_task(model, SHOTS, _protos(model), model.tasks, steps=5, seed=0).answers is None
    # The prior was fitted to lower CE on the examples (b = 0 is a candidate of the fit): served with it, the
    # examples' mean log-probability of their own label is at least that without it.
    _, (hidden, mask), _ = _encode(model, SHOTS)
    layers = [
        AdapterWeights(*(t.expand(len(SHOTS), *t.shape[1:]) for t in w.tensors()))
        for w in adapted_adapters(model, result).layers
    ]

    def own_label_logp(answer_space):
        with torch.no_grad():
            scored = rank(model, hidden, mask, layers, [answer_space] * len(SHOTS))
        return float(np.mean([np.log(s.probabilities[e.target]) for s, e in zip(scored, SHOTS, strict=True)]))

    assert own_label_logp(space) >= own_label_logp(AnswerSpace(tuple(labels))) - 1e-6


def test_files_read_a_page_at_a_time_give_what_each_file_gives_alone():
    """vectors_of_many (a replica's catch-up) against from_bytes (one file): the same prototype and key for the
    files of the first one's layout; None (read alone) for another layout, a truncated file, junk."""
    from safetensors.numpy import save as np_save

    rng = np.random.default_rng(0)
    half = [AdaptedTensors(rng.standard_normal(16), rng.standard_normal(16), None).to_bytes() for _ in range(3)]
    wide = np_save({"prototype": rng.standard_normal(16).astype(np.float32), "key": np.ones(16, np.float32)})
    files = [half[0], wide, half[1], half[2][:-2], b"junk", half[2]]
    out = vectors_of_many(files)
    for i in (0, 2, 5):
        alone = AdaptedTensors.from_bytes(files[i], n_layers=1)
        np.testing.assert_array_equal(out[i][0], alone.prototype)
        np.testing.assert_array_equal(out[i][1], alone.key)
        assert out[i][0].dtype == np.float16 and out[i][0].shape == (16,)
    assert out[1] is None and out[3] is None and out[4] is None
    assert vectors_of_many([b"junk", *half]) == [None] * 4, "the first file sets the layout"
    assert vectors_of_many([wide])[0] is not None and vectors_of_many([]) == []
    gaps = vectors_of_many([None, half[0], b"", half[1]])  # removals in a page: no file, no layout from them
    assert gaps[0] is None and gaps[2] is None and gaps[1] is not None and gaps[3] is not None
