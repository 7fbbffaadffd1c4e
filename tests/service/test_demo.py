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
