"""The bundled demo over HTTP: long inputs within its 256-token window, answers with label probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_helpers import running_app

pytestmark = pytest.mark.pretrained

DEMO = Path(__file__).resolve().parents[2] / "pha_core" / "assets" / "demo"
# An RTE-style row of ~230 tokens: over the old 128-token window, inside the demo's 256.
PREMISE = " ".join(["The committee met on Tuesday to discuss the budget of the new regional hospital."] * 13)
LONG_RTE = f"sentence1: {PREMISE} sentence2: The committee discussed a hospital budget."


@pytest.fixture(scope="module")
def client():
    with running_app(DEMO) as client:
        yield client


def test_inputs_up_to_256_tokens_are_served(client):
    n = client.app.state.pha.engine.count_tokens([LONG_RTE])[0]
    assert 128 < n <= 256, n
    assert client.app.state.pha.predictor.limits.max_input_tokens == 256  # /predict and /adapt share it
    response = client.post("/predict", json={"inputs": LONG_RTE, "task": "rte"})
    assert response.status_code == 200, response.text
    answer = response.json()["predictions"][0]
    assert answer["output"] in ("entailment", "not_entailment")
    assert set(answer["probabilities"]) == {"entailment", "not_entailment"}
    assert answer["probabilities"][answer["output"]] >= 0.5
    too_long = client.post("/predict", json={"inputs": LONG_RTE + " more" * 60, "task": "rte"})
    assert too_long.status_code == 422 and "256" in too_long.json()["detail"]


def test_routed_answers_are_labels_of_the_routed_task(client):
    texts = [
        "sentence: a gripping, beautifully acted film",
        "question1: how do I learn python? question2: what is the best way to learn python?",
        "premise: The tank was full. hypothesis: The tank was empty.",
    ]
    predictions = client.post("/predict", json={"inputs": texts}).json()["predictions"]
    prototypes = {p["name"]: p for p in client.get("/prototypes").json()["prototypes"]}
    for p in predictions:
        labels = prototypes[p["task"]]["labels"]
        assert p["output"] in labels and set(p["probabilities"]) == set(labels)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.data
def test_server_routing_agrees_with_evaluation_routing(client, data_dir):
    """The FAISS index of the server and Eq. 10 as `pha eval` computes it pick the same task, same cosine."""
    import torch

    from pha_core.data import load_splits
    from pha_core.evaluate import predict_examples

    state = client.app.state.pha
    model = state.engine.model
    splits = load_splits(model.tasks, data_dir, n_train=1, max_eval=12)
    rows = [e for task in model.tasks for e in splits[task]["test"]]
    evaluated = predict_examples(model, rows)["routes"]
    encoded = state.engine.encode([e.input for e in rows])
    served = state.index.search(encoded.z)
    assert [r.task for r in served] == evaluated
    expected = model.retrieve(torch.as_tensor(encoded.z))
    assert [r.score for r in served] == pytest.approx(expected.scores[:, 0].tolist(), abs=1e-5)
    assert [r.margin for r in served] == pytest.approx(expected.margin.tolist(), abs=1e-5)
    # And over HTTP: what /predict reports is that route.
    body = client.post("/predict", json={"inputs": [e.input for e in rows[:4]]}).json()["predictions"]
    assert [p["route"]["task"] for p in body] == evaluated[:4]
