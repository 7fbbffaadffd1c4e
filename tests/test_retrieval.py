"""Eq. 10 retrieval: nearest prototype by cosine, with score and margin; and the model's retriever G."""

import math

import pytest
import torch

from pha_core.model import PHAModel
from pha_core.retriever import masked_mean, retrieve
from tests.support.tiny import tiny_config


def test_retrieve_picks_the_nearest_prototype_by_cosine():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    z = torch.tensor([[3.0, 0.1], [0.2, 1.0]])
    r = retrieve(z, prototypes, top_k=2)
    assert r.indices[:, 0].tolist() == [0, 1]
    cos00 = 3.0 / (3.0**2 + 0.1**2) ** 0.5
    cos01 = 0.1 / (3.0**2 + 0.1**2) ** 0.5
    assert r.scores[0, 0].item() == pytest.approx(cos00, rel=1e-5)
    assert r.margin[0].item() == pytest.approx(cos00 - cos01, rel=1e-5)


def test_retrieve_with_one_prototype_and_with_none():
    r = retrieve(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert r.indices.tolist() == [[0]] and math.isnan(r.margin.item())  # no runner-up: no margin
    with pytest.raises(LookupError, match="no prototypes"):
        retrieve(torch.tensor([[1.0, 0.0]]), torch.zeros(0, 2))


def test_masked_mean_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_model_retrieve_routes_to_a_prototype_set_at_an_input():
    model = PHAModel(tiny_config()).eval()
    with torch.no_grad():
        h, mask = model.encode(model.source(["sentence: great", "premise: a hypothesis: b"]))
        z = model.instance_vectors(h, mask)
        model.prototypes.weight[2] = z[0] * 10  # make task 2 the exact direction of input 0
        r = model.retrieve(z)
    assert r.indices[0, 0].item() == 2
    assert r.scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_variants_without_prototypes_cannot_route():
    model = PHAModel(tiny_config(variant="no_prototype"))
    with pytest.raises(ValueError, match="cannot route"):
        model.retrieve(torch.randn(1, 16))
